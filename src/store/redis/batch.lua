-- One request's hits, applied atomically: the twin of
-- src/algorithm/batch.rs (apply_batch).
--
-- KEYS[i]   state key of hit i: a hash with fields a, b, c (the three state
--           numbers), expiring when its state becomes meaningless
-- ARGV[1]   mode: 0 independent (Envoy), 1 all-or-nothing, 2 dry run
-- ARGV[2]   now in Unix milliseconds, or "" to read Redis TIME (production;
--           tests pass a time to drive the script like the Rust twin)
-- ARGV[3..] five per hit: algorithm id, limit, window_ms, hits, enforced (1/0)
--
-- Returns four integers per hit: allowed (1/0), remaining, reset_after_ms,
-- retry_after_ms (-1: none).

local algorithms = { [1] = fixed_window }

local mode = tonumber(ARGV[1])
local now
if ARGV[2] ~= '' then
  now = tonumber(ARGV[2])
else
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

-- State as first read (for the rollback view) and as written so far.
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

local function state_of(stored)
  if stored then
    return stored.state
  end
  return { 0, 0, 0 }
end

local function hit_args(i)
  local base = 3 + (i - 1) * 5
  return algorithms[tonumber(ARGV[base])], tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]),
    tonumber(ARGV[base + 3]), ARGV[base + 4] == '1'
end

local results = {}
local written = {}
local all_enforced_allowed = true
for i = 1, #KEYS do
  local algorithm, limit, window, hits, enforced = hit_args(i)
  local eval = algorithm(limit, window, state_of(load(KEYS[i])), hits, now)
  if (not eval.allowed) and enforced then
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

local commit = mode == 0 or (mode == 1 and all_enforced_allowed)
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
else
  for i = 1, #KEYS do
    local algorithm, limit, window = hit_args(i)
    local now_eval = algorithm(limit, window, state_of(original[KEYS[i]]), 0, now)
    results[i].remaining = now_eval.remaining
    results[i].reset_after = now_eval.reset_after
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
