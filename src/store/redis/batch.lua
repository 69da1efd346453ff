-- One request's hits, applied atomically: the twin of
-- src/algorithm/batch.rs (apply_batch).
--
-- KEYS[i]   state key of hit i: a hash with fields a, b, c (the three state
--           numbers), expiring when its state becomes meaningless
-- ARGV[1]   mode: 0 independent (Envoy), 1 all-or-nothing, 2 dry run,
--           3 independent but count only over-limit hits when any is over
-- ARGV[2]   now in Unix milliseconds, or "" to read Redis TIME (production;
--           tests pass a time to drive the script like the Rust twin)
-- ARGV[3..] six per hit: algorithm id (1 fixed window, 2 sliding window,
--           3 token bucket), limit, window_ms, burst, hits, enforced (1/0)
--
-- Returns four integers per hit: allowed (1/0), remaining, reset_after_ms,
-- retry_after_ms (-1: none).

local algorithms = { [1] = fixed_window, [2] = sliding_window, [3] = token_bucket }
local ARGS_PER_HIT = 6

local mode = tonumber(ARGV[1])
local now
if ARGV[2] ~= '' then
  now = tonumber(ARGV[2])
else
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

local hits_args = {}
for i = 1, #KEYS do
  local base = 3 + (i - 1) * ARGS_PER_HIT
  hits_args[i] = {
    algorithm = algorithms[tonumber(ARGV[base])],
    limit = tonumber(ARGV[base + 1]),
    window = tonumber(ARGV[base + 2]),
    burst = tonumber(ARGV[base + 3]),
    hits = tonumber(ARGV[base + 4]),
    enforced = ARGV[base + 5] == '1',
  }
end

-- State as first read (for rollback) and as written so far.
local original = {}
local current = {}
local function load(key)
  if current[key] == nil then
    local fields = redis.call('HMGET', key, 'a', 'b', 'c')
    local stored = false
    if fields[1] then
      stored = { state = { tonumber(fields[1]), tonumber(fields[2]) or 0, tonumber(fields[3]) or 0 } }
    end
    original[key] = stored
    current[key] = stored
  end
  return current[key]
end

local function evaluate(i, stored, hits)
  local h = hits_args[i]
  local state = { 0, 0, 0 }
  if stored then
    state = stored.state
  end
  return h.algorithm(h.limit, h.window, h.burst, state, hits, now)
end

-- Evaluates every hit in order, writing to `current` as it goes; hit i
-- counts its hits when counts(i), else it is judged with 0 hits.
local function pass(counts)
  local results, written, all_enforced_allowed = {}, {}, true
  for i = 1, #KEYS do
    local hits = 0
    if counts(i) then
      hits = hits_args[i].hits
    end
    local eval = evaluate(i, load(KEYS[i]), hits)
    if (not eval.allowed) and hits_args[i].enforced then
      all_enforced_allowed = false
    end
    local write = eval.rejected
    if eval.allowed then
      write = eval.admitted
    end
    if write then
      current[KEYS[i]] = write
      written[#written + 1] = KEYS[i]
    end
    results[i] = eval
  end
  return results, written, all_enforced_allowed
end

local function rollback()
  for key, stored in pairs(original) do
    current[key] = stored
  end
end

local results, written, all_enforced_allowed = pass(function() return true end)
local commit = true
if mode == 1 or mode == 2 then
  commit = mode == 1 and all_enforced_allowed
  if not commit then
    rollback()
    for i = 1, #KEYS do
      local now_eval = evaluate(i, current[KEYS[i]], 0)
      results[i].remaining = now_eval.remaining
      results[i].reset_after = now_eval.reset_after
    end
  end
elseif mode == 3 then
  local over = {}
  local any_over = false
  for i = 1, #KEYS do
    over[i] = not results[i].allowed
    any_over = any_over or over[i]
  end
  if any_over then
    rollback()
    results, written = pass(function(i) return over[i] end)
  end
end

if commit then
  local flushed = {}
  for _, key in ipairs(written) do
    if not flushed[key] then
      flushed[key] = true
      local stored = current[key]
      redis.call('HSET', key,
        'a', string.format('%.0f', stored.state[1]),
        'b', string.format('%.0f', stored.state[2]),
        'c', string.format('%.0f', stored.state[3]))
      -- The key never outlives its state: expiry is set in the same atomic step.
      redis.call('PEXPIRE', key, math.max(1, stored.expires_at - now))
    end
  end
end

local reply = {}
for i = 1, #KEYS do
  local eval = results[i]
  local allowed = 0
  if eval.allowed then
    allowed = 1
  end
  reply[#reply + 1] = allowed
  reply[#reply + 1] = eval.remaining
  reply[#reply + 1] = eval.reset_after
  reply[#reply + 1] = eval.retry_after
end
return reply
