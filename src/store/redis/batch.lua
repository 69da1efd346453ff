-- One request's hits, applied atomically: the twin of
-- src/algorithm/batch.rs (apply_batch).
--
-- KEYS[i]   state key of hit i: four packed doubles, the state numbers and
--           the Unix ms at which the state expires (all exact integers below
--           2^53). A state read after its expiry is absent, whatever Redis's
--           own TTL says, exactly as in the memory store.
-- ARGV[1]   mode: 0 independent (Envoy), 1 all-or-nothing, 2 dry run,
--           3 independent but count only over-limit hits when any is over
-- ARGV[2]   now in Unix milliseconds, or "" to read Redis TIME (production;
--           tests pass a time to drive the script like the Rust twin)
-- ARGV[3]   milliseconds added to each key's Redis TTL beyond its state's
--           expiry: expiry jitter, so the keys of one window do not all
--           expire in the same millisecond (0: none)
-- ARGV[4..] six per hit: algorithm id (1 fixed window, 2 sliding window,
--           3 token bucket), limit, window_ms, burst, hits, enforced (1/0)
--
-- Returns four integers per hit: allowed (1/0), remaining, reset_after_ms,
-- retry_after_ms (-1: none).
--
-- Kept lean because it runs on every request inside Redis: flat arrays
-- instead of a table per result, and GET/SET of a packed value (two calls per
-- key) instead of a hash (three).

local algorithms = { fixed_window, sliding_window, token_bucket }
local ARGS_PER_HIT = 6
local FIRST_HIT_ARG = 4
local n = #KEYS

local mode = tonumber(ARGV[1])
local now
if ARGV[2] ~= '' then
  now = tonumber(ARGV[2])
else
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
local ttl_extra = tonumber(ARGV[3])

local algorithm, limit, window, burst, hits, enforced = {}, {}, {}, {}, {}, {}
for i = 1, n do
  local base = FIRST_HIT_ARG + (i - 1) * ARGS_PER_HIT
  algorithm[i] = algorithms[tonumber(ARGV[base])]
  limit[i] = tonumber(ARGV[base + 1])
  window[i] = tonumber(ARGV[base + 2])
  burst[i] = tonumber(ARGV[base + 3])
  hits[i] = tonumber(ARGV[base + 4])
  enforced[i] = ARGV[base + 5] == '1'
end

-- State per key, as first read (for rollback) and as written so far:
-- {s1, s2, s3, expires_at} or false when absent.
local original, current = {}, {}
local function load(key)
  local state = current[key]
  if state == nil then
    state = false
    local packed = redis.call('GET', key)
    if packed then
      local s1, s2, s3, expires_at = struct.unpack('dddd', packed)
      if expires_at > now then
        state = { s1, s2, s3, expires_at }
      end
    end
    original[key] = state
    current[key] = state
  end
  return state
end

local function evaluate(i, state, count)
  if state then
    return algorithm[i](limit[i], window[i], burst[i], state[1], state[2], state[3], count, now)
  end
  return algorithm[i](limit[i], window[i], burst[i], 0, 0, 0, count, now)
end

local allowed, remaining, reset_after, retry_after = {}, {}, {}, {}
local written = {}

-- Evaluates every hit in order, writing to `current` as it goes; hit i
-- counts its hits when counts[i] (all of them when counts is nil).
local function pass(counts)
  local all_enforced_allowed = true
  written = {}
  for i = 1, n do
    local count = hits[i]
    if counts and not counts[i] then
      count = 0
    end
    local key = KEYS[i]
    local ok, left, reset, retry, s1, s2, s3, expires_at, rejection_counts = evaluate(i, load(key), count)
    if (not ok) and enforced[i] then
      all_enforced_allowed = false
    end
    -- A hit that adds nothing writes nothing (see batch.rs).
    if count > 0 and (ok or rejection_counts) then
      current[key] = { s1, s2, s3, expires_at }
      written[#written + 1] = key
    end
    allowed[i], remaining[i], reset_after[i], retry_after[i] = ok, left, reset, retry
  end
  return all_enforced_allowed
end

local function rollback()
  for key, state in pairs(original) do
    current[key] = state
  end
end

local all_enforced_allowed = pass(nil)
local commit = true
if mode == 1 or mode == 2 then
  commit = mode == 1 and all_enforced_allowed
  if not commit then
    rollback()
    for i = 1, n do
      local _, left, reset = evaluate(i, current[KEYS[i]], 0)
      remaining[i], reset_after[i] = left, reset
    end
  end
elseif mode == 3 then
  local over, any_over = {}, false
  for i = 1, n do
    over[i] = not allowed[i]
    any_over = any_over or over[i]
  end
  if any_over then
    rollback()
    pass(over)
  end
end

if commit then
  local flushed = {}
  for _, key in ipairs(written) do
    if not flushed[key] then
      flushed[key] = true
      local state = current[key]
      -- The key never outlives its state by more than the jitter: the
      -- expiry is set in the same command.
      redis.call('SET', key, struct.pack('dddd', state[1], state[2], state[3], state[4]),
        'PX', math.max(1, state[4] - now) + ttl_extra)
    end
  end
end

local reply = {}
for i = 1, n do
  local flag = 0
  if allowed[i] then
    flag = 1
  end
  reply[4 * i - 3] = flag
  reply[4 * i - 2] = remaining[i]
  reply[4 * i - 1] = reset_after[i]
  reply[4 * i] = retry_after[i]
end
return reply
