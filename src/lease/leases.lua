-- ratekeeper's leases in Redis: one call applies one operation to every
-- concurrency key of a request, atomically, so a grant is all or nothing.
-- The Rust twin is src/lease/table.rs (the spec); tests drive both with the
-- same sequences.
--
-- KEYS      four per key of the request, in order: the named leases' ZSET
--           (member 'i'..lease id, score expiry ms), the HASH (member ->
--           'permits:token', '#t' total permits of named leases, '#f' last
--           fencing token), the anonymous slots' ZSET and the debts' ZSET
--           (member id, score expiry ms). All four share a hash tag.
-- ARGV[1]   operation: acquire, renew, release, take or free
-- ARGV[2]   now in Unix ms, or '' to read Redis TIME (tests drive the clock)
-- ARGV[3]   lease id (acquire, renew, release)
-- ARGV[4]   permits (acquire) or slots (take, free)
-- ARGV[5]   TTL in ms (acquire, renew, take)
-- then per key: its limit, and the TTL in ms each of its Redis keys is
--           given when written (longer than any entry the rule allows lives,
--           so a key outlives its entries and vanishes once idle)
--
-- Returns code (1 granted, 2 denied, 3 not found, 4 released, 5 already
-- released), expires_at ms (0: none), retry_after ms (-1: none), then per
-- key: permits in use, fencing token (0: none), permits purged as expired.

local op = ARGV[1]
local now = tonumber(ARGV[2])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local id = ARGV[3]
local n = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
local count = #KEYS / 4
local MAX_DEBTS = 10000
local member = 'i' .. id

local function fmt(x)
  return string.format('%.0f', x)
end

local function keys_of(i)
  local at = (i - 1) * 4
  return KEYS[at + 1], KEYS[at + 2], KEYS[at + 3], KEYS[at + 4]
end

local function limit_of(i)
  return tonumber(ARGV[5 + (i - 1) * 2 + 1])
end

local function permits_and_token(h, m)
  local v = redis.call('HGET', h, m)
  if not v then
    return 0, 0
  end
  local permits, token = string.match(v, '^(%d+):(%d+)$')
  return tonumber(permits), tonumber(token)
end

-- Drops what expired at `now`; the permits purged.
local function purge(i)
  local z, h, a, d = keys_of(i)
  local purged = 0
  local gone = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  if #gone > 0 then
    for _, m in ipairs(gone) do
      local permits = permits_and_token(h, m)
      purged = purged + permits
      redis.call('HDEL', h, m)
    end
    redis.call('ZREMRANGEBYSCORE', z, '-inf', now)
    redis.call('HINCRBY', h, '#t', -purged)
  end
  purged = purged + redis.call('ZREMRANGEBYSCORE', a, '-inf', now)
  redis.call('ZREMRANGEBYSCORE', d, '-inf', now)
  return purged
end

-- Permits held per key, read once after the purge and kept up to date.
local used = {}

local function in_use(i)
  return used[i]
end

local function next_fence(i)
  local _, h = keys_of(i)
  local f = tonumber(redis.call('HGET', h, '#f')) or 0
  if f == 0 then
    f = now * 1000
  end
  f = f + 1
  redis.call('HSET', h, '#f', fmt(f))
  return f
end

local function soonest_expiry_in(i)
  local z, _, a = keys_of(i)
  local soonest = nil
  for _, key in ipairs({ z, a }) do
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if #first > 0 then
      local e = tonumber(first[2])
      if not soonest or e < soonest then
        soonest = e
      end
    end
  end
  if soonest then
    return soonest - now
  end
  return nil
end

-- nil when every key not held has room for `permits`; else the retry hint
-- (-1: none).
local function denied(held, permits)
  local is_denied = false
  local retry = 0
  for i = 1, count do
    local limit = limit_of(i)
    if not held[i] and in_use(i) + permits > limit then
      is_denied = true
      local wait = nil
      if permits <= limit then
        wait = soonest_expiry_in(i)
      end
      if wait and retry >= 0 then
        retry = math.max(retry, wait)
      else
        retry = -1
      end
    end
  end
  if is_denied then
    return retry
  end
  return nil
end

local expired = {}
for i = 1, count do
  expired[i] = purge(i)
  local _, h, a = keys_of(i)
  used[i] = (tonumber(redis.call('HGET', h, '#t')) or 0) + redis.call('ZCARD', a)
end
-- Per key, the Redis keys written with entries that must outlive them.
local touched = {}
for i = 1, count do
  touched[i] = {}
end
local tokens = {}
for i = 1, count do
  tokens[i] = 0
end
local code, expires_at, retry = 1, 0, -1

if op == 'acquire' then
  local held = {}
  for i = 1, count do
    local z = keys_of(i)
    held[i] = redis.call('ZSCORE', z, member) ~= false
  end
  local refused = denied(held, n)
  if refused then
    code, retry = 2, refused
  else
    for i = 1, count do
      local z, h = keys_of(i)
      if held[i] then
        local _, token = permits_and_token(h, member)
        tokens[i] = token
      else
        local token = next_fence(i)
        redis.call('ZADD', z, fmt(now + ttl), member)
        redis.call('HSET', h, member, fmt(n) .. ':' .. fmt(token))
        redis.call('HINCRBY', h, '#t', n)
        used[i] = used[i] + n
        touched[i] = { z, h }
        tokens[i] = token
      end
      local e = tonumber(redis.call('ZSCORE', z, member))
      if expires_at == 0 or e < expires_at then
        expires_at = e
      end
    end
  end
elseif op == 'renew' then
  local all = true
  for i = 1, count do
    local z = keys_of(i)
    if redis.call('ZSCORE', z, member) == false then
      all = false
    end
  end
  if all then
    for i = 1, count do
      local z, h = keys_of(i)
      redis.call('ZADD', z, 'XX', fmt(now + ttl), member)
      local _, token = permits_and_token(h, member)
      touched[i] = { z, h }
      tokens[i] = token
    end
    expires_at = now + ttl
  else
    code = 3
  end
elseif op == 'release' then
  code = 5
  for i = 1, count do
    local z, h = keys_of(i)
    if redis.call('ZREM', z, member) == 1 then
      local permits = permits_and_token(h, member)
      redis.call('HDEL', h, member)
      redis.call('HINCRBY', h, '#t', -permits)
      used[i] = used[i] - permits
      code = 4
    end
  end
elseif op == 'take' then
  local held = {}
  for i = 1, count do
    held[i] = false
  end
  local refused = denied(held, n)
  if refused then
    code, retry = 2, refused
    for i = 1, count do
      local _, h, _, d = keys_of(i)
      touched[i] = { h, d }
      local debts = redis.call('ZCARD', d)
      for _ = 1, n do
        if debts >= MAX_DEBTS then
          break
        end
        redis.call('ZADD', d, fmt(now + ttl), fmt(next_fence(i)))
        debts = debts + 1
      end
    end
  else
    for i = 1, count do
      local _, h, a = keys_of(i)
      for _ = 1, n do
        redis.call('ZADD', a, fmt(now + ttl), fmt(next_fence(i)))
      end
      used[i] = used[i] + n
      touched[i] = { h, a }
    end
    expires_at = now + ttl
  end
elseif op == 'free' then
  code = 4
  for i = 1, count do
    local _, _, a, d = keys_of(i)
    for _ = 1, n do
      if #redis.call('ZPOPMIN', d) == 0 then
        if #redis.call('ZPOPMIN', a) == 0 then
          break
        end
        used[i] = used[i] - 1
      end
    end
  end
else
  return redis.error_reply('ERR unknown lease operation ' .. tostring(op))
end

local reply = { code, expires_at, retry }
for i = 1, count do
  local keep = ARGV[5 + (i - 1) * 2 + 2]
  for _, key in ipairs(touched[i]) do
    redis.call('PEXPIRE', key, keep)
  end
  reply[#reply + 1] = in_use(i)
  reply[#reply + 1] = tokens[i]
  reply[#reply + 1] = expired[i]
end
return reply
