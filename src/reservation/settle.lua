-- Settles one reservation in Redis, atomically: the record is consumed
-- (turned into a tombstone holding the settled cost) and actual - estimate
-- is applied to the counters it charged, in one call. The Rust settle
-- (src/reservation/adjust.rs) is the spec; this is its twin over the
-- ratekeeper.lua state layout (a fixed window's count at the counter's key,
-- '|', the window's number: its start over its length; a sliding window's
-- in a hash field per start).
--
-- KEYS[1]   the reservation record (a hash: d domain, e estimate,
--           x expires at (Unix ms), s 'open' or the settled cost)
-- KEYS[2..] the counters it charged, in the record's order
-- ARGV[1]   now in Unix ms, or '' to read Redis TIME
-- ARGV[2]   domain    ARGV[3] actual cost
-- ARGV[4]   ms the tombstone lives   ARGV[5] expiry jitter   ARGV[6] TTL
--           grace (as ratekeeper.lua: a TTL gets the jitter modulo the
--           lifetime it extends, plus the grace)
-- then per counter five: algorithm (1 fixed, 2 sliding, 3 token bucket),
-- limit, window_ms, burst, window start
--
-- Returns {status, n}: 1 settled (n: estimate), 2 already settled at this
-- cost (n: estimate), 3 settled at another cost (n: that cost), 0 not found
-- (n: 1 when it had just expired).

local FW, SW, TB = 1, 2, 3
local COUNT_CAP = 2 ^ 50

local rec = KEYS[1]
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local domain, actual = ARGV[2], tonumber(ARGV[3])
local tombstone_ms, jitter, grace = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])

local got = redis.call('HMGET', rec, 'd', 'e', 'x', 's')
if not got[1] or got[1] ~= domain then
  return { 0, 0 }
end
local estimate = tonumber(got[2])
if got[4] ~= 'open' then
  local settled = tonumber(got[4])
  if settled == actual then
    return { 2, estimate }
  end
  return { 3, settled }
end
if tonumber(got[3]) <= now then
  redis.call('DEL', rec)
  return { 0, 1 }
end
redis.call('HSET', rec, 's', actual)
redis.call('PEXPIRE', rec, tombstone_ms + jitter % tombstone_ms + grace)
if actual == estimate then
  return { 1, estimate }
end

for i = 2, #KEYS do
  local k = KEYS[i]
  local a = 7 + (i - 2) * 5
  local alg, limit, w, burst, start =
    tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), ARGV[a + 4]
  if alg == FW then
    -- Only a window the counter still holds: once gone, moot. INCRBY keeps
    -- the window's TTL.
    local wk = k .. '|' .. string.format('%d', tonumber(start) / w)
    local count = redis.call('GET', wk)
    if count then
      local settled = math.min(math.max(0, tonumber(count) + actual - estimate), COUNT_CAP)
      redis.call('INCRBY', wk, string.format('%d', settled - tonumber(count)))
    end
  elseif alg == SW then
    -- Only a window the counter still holds: once gone, moot.
    local count = redis.call('HGET', k, start)
    if count then
      local settled = math.min(math.max(0, tonumber(count) + actual - estimate), COUNT_CAP)
      redis.call('HSET', k, start, string.format('%d', settled))
    end
  else
    local capacity = burst * w
    local drain = math.max(limit, 1)
    local level, present = 0, false
    local packed = redis.call('GET', k)
    if packed then
      local l, measured, expires = struct.unpack('ddd', packed)
      if expires > now then
        present = true
        level = math.max(0, math.min(l, capacity) - math.max(0, now - measured) * drain)
      end
    end
    local settled
    if actual > estimate then
      settled = math.min(capacity, level + (actual - estimate) * w)
    else
      settled = math.max(0, level - (estimate - actual) * w)
    end
    if present or settled > 0 then
      local q = math.floor(settled / drain)
      if q * drain < settled then
        q = q + 1
      end
      local expires = now + q
      redis.call('SET', k, struct.pack('ddd', settled, now, expires), 'PX', math.max(1, expires - now) + jitter % w + grace)
    end
  end
end
return { 1, estimate }
