-- Refunds (Envoy's negative hits on counting rules): takes hits back from
-- counters in ratekeeper's key layout, never below zero. The Rust twin is
-- src/algorithm/refund.rs; tests/leases.rs drives the memory store (which
-- runs it) and this script with the same sequences.
--
-- KEYS      the counters
-- ARGV[1]   now in Unix ms, or '' to read Redis TIME (tests drive the clock)
-- ARGV[2]   expiry jitter and ARGV[3] TTL grace, in ms: a rewritten token
--           bucket's TTL gets them as the decision code adds them
-- then five per key: algorithm (1 fixed window, 2 sliding window, 3 token
--           bucket), limit, window_ms, burst, hits
--
-- State as the decision code keeps it (ratekeeper.lua): a fixed window's
-- count at the counter's key followed by '|' and the window's number (its
-- start over its length); a
-- sliding window's counts in a hash field per window start; a token bucket
-- as three packed doubles (level, measured_at, expires_at).

local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local jitter, grace = tonumber(ARGV[2]) or 0, tonumber(ARGV[3]) or 0

for i, kk in ipairs(KEYS) do
  local b = 4 + (i - 1) * 5
  local alg = tonumber(ARGV[b])
  local limit = tonumber(ARGV[b + 1])
  local w = tonumber(ARGV[b + 2])
  local burst = tonumber(ARGV[b + 3])
  local hits = tonumber(ARGV[b + 4])
  if alg == 3 then
    local packed = redis.call('GET', kk)
    if packed then
      local level, measured, expires = struct.unpack('ddd', packed)
      if expires > now then
        local drain = math.max(limit, 1)
        level = math.max(0, math.min(level, burst * w) - math.max(0, now - measured) * drain)
        if level > 0 and hits > 0 then
          local after = math.max(0, level - hits * w)
          local q = math.floor(after / drain)
          if q * drain < after then
            q = q + 1
          end
          redis.call('SET', kk, struct.pack('ddd', after, now, now + q),
            'PX', math.max(1, q) + jitter % w + grace)
        end
      end
    end
  elseif alg == 1 then
    local wk = kk .. '|' .. string.format('%d', (now - (now % w)) / w)
    local count = tonumber(redis.call('GET', wk)) or 0
    if count > 0 and hits > 0 then
      redis.call('INCRBY', wk, -math.min(count, hits))
    end
  else
    local start = now - (now % w)
    local count = tonumber(redis.call('HGET', kk, start)) or 0
    if count > 0 and hits > 0 then
      redis.call('HINCRBY', kk, start, -math.min(count, hits))
    end
  end
end
return 1
