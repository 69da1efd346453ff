-- ratekeeper's decisions in Redis: one call carries a batch of decisions
-- (the requests that were waiting for this connection), each applied
-- atomically in its own mode; the whole call is atomic too. Loaded once as a
-- function library (FCALL), or as a script (EVALSHA) where functions are not
-- available. The Rust algorithms (src/algorithm) are the spec: this code
-- decides and writes; Rust computes each answer's details from the states
-- returned here, and checks that it decides alike.
--
-- KEYS      every hit's key, decision after decision
-- ARGV[1]   now in Unix ms, or '' to read Redis TIME (production; tests
--           drive the clock)
-- ARGV[2]   ms added to every key's TTL beyond its state's (expiry jitter)
-- then per decision:
--           mode (0 independent, 1 all-or-nothing, 2 dry run,
--           3 independent counting only the over-limit hits when any is
--           over), the number of its hits, then six per hit: algorithm
--           (1 fixed window, 2 sliding window, 3 token bucket), limit,
--           window_ms, burst, hits, enforced (1/0)
--
-- Returns now, then three per hit: allowed (1/0) and the state of its key
-- as the decision found it: for the window algorithms the counts of now's
-- window and of the one before; for the token bucket its level and when it
-- was measured (0 0: absent).
--
-- State in Redis:
-- - fixed and sliding window: a hash whose fields are window starts (Unix
--   ms) and values the counts of those windows, so the common case is one
--   HINCRBY; a clock stepped back into the previous window finds that
--   window's own count. A window's first hit sets the TTL (never shortening
--   it) and drops the field two windows back.
-- - token bucket: a string of three packed doubles: level, measured_at,
--   expires_at (read as absent once expired, whatever the TTL).
--
-- Kept lean: it runs for every request inside Redis's one thread. No
-- closures or tables per hit beyond the per-key state, integers only.

local FW, SW, TB = 1, 2, 3
local ARGS_PER_HIT = 6

local function ceil_div(a, b)
  local q = math.floor(a / b)
  if q * b < a then
    q = q + 1
  end
  return q
end

-- A window's first hit: the key lives while the window (a sliding window:
-- the next one too) can matter — never less than it already does — and the
-- field two windows back goes.
local function first_hit(kk, alg, start, w, now, extra)
  local span = w
  if alg == SW then
    span = 2 * w
  end
  local want = start + span - now + extra
  local ttl = redis.call('PTTL', kk)
  if ttl < want then
    redis.call('PEXPIRE', kk, want)
  end
  if ttl ~= -1 then
    redis.call('HDEL', kk, start - 2 * w)
  end
end

local function decide_all(keys, argv)
  local now
  if argv[1] ~= '' then
    now = tonumber(argv[1])
  else
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  local extra = tonumber(argv[2])
  local reply = { now }
  local k = 0 -- keys used so far
  local a = 3 -- next argument

  while a <= #argv do
    local mode = tonumber(argv[a])
    local count = tonumber(argv[a + 1])
    a = a + 2

    local key, alg, limit, window, burst, hits, enforced, start = {}, {}, {}, {}, {}, {}, {}, {}
    for i = 1, count do
      key[i] = keys[k + i]
      alg[i] = tonumber(argv[a])
      limit[i] = tonumber(argv[a + 1])
      window[i] = tonumber(argv[a + 2])
      burst[i] = tonumber(argv[a + 3])
      hits[i] = tonumber(argv[a + 4])
      enforced[i] = argv[a + 5] == '1'
      if alg[i] ~= TB then
        start[i] = now - (now % window[i])
      end
      a = a + ARGS_PER_HIT
    end
    k = k + count

    -- Per key: the state the decision found (fx, fy), the state in Redis
    -- now (bx, by) and the state as the decision has changed it (cx, cy).
    local fx, fy, bx, by, cx, cy = {}, {}, {}, {}, {}, {}

    local function load(i)
      local kk = key[i]
      if fx[kk] ~= nil then
        return
      end
      local v1, v2 = 0, 0
      if alg[i] == FW then
        v1 = tonumber(redis.call('HGET', kk, start[i])) or 0
      elseif alg[i] == SW then
        local got = redis.call('HMGET', kk, start[i], start[i] - window[i])
        v1, v2 = tonumber(got[1]) or 0, tonumber(got[2]) or 0
      else
        local packed = redis.call('GET', kk)
        if packed then
          local level, measured, expires = struct.unpack('ddd', packed)
          if expires > now then
            v1, v2 = level, measured
          end
        end
      end
      fx[kk], fy[kk], bx[kk], by[kk], cx[kk], cy[kk] = v1, v2, v1, v2, v1, v2
    end

    -- Judges hit i counting `n` hits against its key's current state, and
    -- updates that state when the hits are taken.
    local function judge(i, n)
      local kk = key[i]
      if alg[i] == FW then
        -- Rejected hits count, as envoyproxy/ratelimit's.
        cx[kk] = cx[kk] + n
        return cx[kk] <= limit[i]
      end
      local w = window[i]
      if alg[i] == SW then
        local ok = cy[kk] * (w - (now - start[i])) + (cx[kk] + n) * w <= limit[i] * w
        if ok then
          cx[kk] = cx[kk] + n
        end
        return ok
      end
      local capacity = burst[i] * w
      local drained = math.max(0, now - cy[kk]) * math.max(limit[i], 1)
      local level = math.max(0, math.min(cx[kk], capacity) - drained)
      local ok = level + n * w <= capacity
      if ok and n > 0 then
        cx[kk], cy[kk] = level + n * w, now
      end
      return ok
    end

    -- Writes hit i's key if the decision changed it since the last write.
    local function write(i)
      local kk = key[i]
      if cx[kk] == bx[kk] and cy[kk] == by[kk] then
        return
      end
      if alg[i] == TB then
        local expires = now + ceil_div(cx[kk], math.max(limit[i], 1))
        redis.call('SET', kk, struct.pack('ddd', cx[kk], cy[kk], expires),
          'PX', math.max(1, expires - now) + extra)
      else
        redis.call('HINCRBY', kk, start[i], cx[kk] - bx[kk])
        if bx[kk] == 0 then
          first_hit(kk, alg[i], start[i], window[i], now, extra)
        end
      end
      bx[kk], by[kk] = cx[kk], cy[kk]
    end

    local allowed = {}
    if mode == 0 then
      -- Independent: each hit on its own, written as it goes. A fixed
      -- window's first hit on its key is one HINCRBY.
      for i = 1, count do
        local kk = key[i]
        if alg[i] == FW and hits[i] > 0 and fx[kk] == nil then
          local after = redis.call('HINCRBY', kk, start[i], hits[i])
          local before = after - hits[i]
          fx[kk], fy[kk], bx[kk], by[kk], cx[kk], cy[kk] = before, 0, after, 0, after, 0
          allowed[i] = after <= limit[i]
          if before == 0 then
            first_hit(kk, FW, start[i], window[i], now, extra)
          end
        else
          load(i)
          allowed[i] = judge(i, hits[i])
          write(i)
        end
      end
    else
      for i = 1, count do
        load(i)
      end
      local all_enforced_allowed, any_over = true, false
      for i = 1, count do
        allowed[i] = judge(i, hits[i])
        if not allowed[i] then
          any_over = true
          if enforced[i] then
            all_enforced_allowed = false
          end
        end
      end
      if mode == 3 and any_over then
        -- Start over from the found state, counting only the over-limit hits.
        local over = {}
        for i = 1, count do
          over[i] = not allowed[i]
          cx[key[i]], cy[key[i]] = fx[key[i]], fy[key[i]]
        end
        for i = 1, count do
          local n = 0
          if over[i] then
            n = hits[i]
          end
          allowed[i] = judge(i, n)
        end
      end
      if mode == 3 or (mode == 1 and all_enforced_allowed) then
        for i = 1, count do
          write(i)
        end
      end
    end

    for i = 1, count do
      local flag = 0
      if allowed[i] then
        flag = 1
      end
      local n = #reply
      reply[n + 1] = flag
      reply[n + 2] = fx[key[i]]
      reply[n + 3] = fy[key[i]]
    end
  end
  return reply
end
