-- ratekeeper's decisions in Redis: one call carries a batch of decisions
-- (the requests that were waiting for this connection), each applied
-- atomically in its own mode; the whole call is atomic too. Loaded once as a
-- function library (FCALL), or as a script (EVALSHA) where functions are not
-- available. The Rust algorithms (src/algorithm) are the spec: this code
-- decides and writes; Rust computes each answer's details from the states
-- returned here, and checks that it decides alike.
--
-- KEYS      every hit's key, group after group
-- ARGV[1]   now in Unix ms, or '' to read Redis TIME (production; tests
--           drive the clock)
-- ARGV[2]   expiry jitter in ms, drawn per call: each key's TTL gets this
--           modulo its window beyond its state's, so the keys of one window
--           expire spread over up to a window, never all at its end
-- ARGV[3]   ms added to every TTL besides (non-zero only while tests drive
--           the clock, whose time need not keep pace with Redis's)
-- then groups, each opened by its kind:
--   4 (a run): count, window_ms, hits, window number. `count`
--           fixed-window hits, each on its own key and each its own
--           independent decision (the Envoy case: a denied hit still
--           counts), all with this window and these hits. Their keys come
--           already windowed for that window number, the window Rust
--           expects from its estimate of this server's clock; when the
--           window of `now` is another (a boundary between the estimate
--           and now, a skewed estimate), the key of `now`'s window is used
--           instead. Nothing is judged here: the reply is each key's count
--           after the hits, and Rust compares it with the limit.
--   0 to 3 (a decision in that mode: 0 independent, 1 all-or-nothing,
--           2 dry run, 3 independent counting only the over-limit hits
--           when any is over): the number of its hits, then six per hit:
--           algorithm (1 fixed window, 2 sliding window, 3 token bucket),
--           limit, window_ms, burst, hits, enforced (1/0)
--
-- Returns now, then per run hit its count after the hits, then per
-- decision hit three integers: allowed (1/0) and the state of its key as
-- the decision found it: for the window algorithms the counts of now's
-- window and of the one before; for the token bucket its level and when it
-- was measured (0 0: absent).
--
-- State in Redis:
-- - fixed window: one integer per window, at the counter's key followed by
--   '|' and the window's number (its start in Unix ms over its length), so
--   the common case is one INCRBY on a key the call names; the window's
--   first hit sets its TTL (the window's end plus the jitter), and an old
--   window's key simply expires. A clock stepped back into the previous
--   window finds that window's own count.
-- - sliding window: a hash whose fields are window starts and values the
--   counts of those windows (a decision reads two). A window's first hit
--   sets the TTL (never shortening it) and drops the field two windows
--   back.
-- - token bucket: a string of three packed doubles: level, measured_at,
--   expires_at (read as absent once expired, whatever the TTL).
--
-- Kept lean: it runs for every request inside Redis's one thread. Nothing
-- is allocated per decision: the working tables below are created once (with
-- the library) and reused, and the functions are defined once. A run — what
-- nearly every Envoy request is — costs one INCRBY per hit and no argument
-- of its own per hit (arguments and the numbers formatted from them are
-- measurable parts of a call's cost).

local FW, SW, TB = 1, 2, 3
local ARGS_PER_HIT = 6
local RUN = 4

-- The number of an argument, each string parsed once: limits, windows, hit
-- counts and group sizes repeat from call to call, and tonumber (strtod)
-- costs more than a lookup of a string Redis has already hashed. Bounded:
-- past MEMO_MAX strings it starts afresh.
local MEMO_MAX = 4096
local memo, memo_size = {}, 0
local function num(s)
  local v = memo[s]
  if v == nil then
    v = tonumber(s)
    if memo_size >= MEMO_MAX then
      memo, memo_size = {}, 0
    end
    memo[s] = v
    memo_size = memo_size + 1
  end
  return v
end

-- A whole number as redis.call should get it: a string. Redis prints a Lua
-- number argument with "%.17g", a float conversion of about 2,200
-- instructions (callgrind, Redis 7.0): 7–8 % of a decision that creates its
-- window's key, whose TTL is such a number. '%d' prints the same digits
-- for the integers this script passes (all far below 2^53) for a fraction
-- of that, and a run formats its TTL once for all its keys.
local function int(n)
  return string.format('%d', n)
end

local function ceil_div(a, b)
  local q = math.floor(a / b)
  if q * b < a then
    q = q + 1
  end
  return q
end

-- The call's time, expiry jitter and TTL grace (ARGV[1] to ARGV[3]).
local now, jitter, grace = 0, 0, 0

-- What a key of window `w` lives beyond its state: the call's jitter, kept
-- under one window (a key of a short window outlives it by less than its
-- length, a long window's keys get the whole spread), plus the grace.
local function ttl_extra(w)
  return jitter % w + grace
end

-- Whether PEXPIRE takes NX and GT (Redis 7): found at the first use.
local expire_options = nil

-- The number of the window starting at `start` (a multiple of `w`), as
-- the string window keys carry (src/rules/key.rs `window_number`).
local function window_number(start, w)
  return int(start / w)
end

-- The key of a fixed-window counter's window numbered `field`.
local function window_key(base, field)
  return base .. '|' .. field
end

-- A sliding window's first hit: the key lives while this window and the
-- next can matter — never less than it already does — and the field two
-- windows back goes. A new key (no TTL yet) costs one PEXPIRE.
local function first_hit(kk, start, w)
  local want = start + 2 * w - now + ttl_extra(w)
  local want_arg = int(want)
  if expire_options == nil then
    expire_options = (redis.REDIS_VERSION_NUM or 0) >= 0x070000
  end
  if expire_options then
    if redis.call('PEXPIRE', kk, want_arg, 'NX') == 0 then
      redis.call('PEXPIRE', kk, want_arg, 'GT')
      redis.call('HDEL', kk, int(start - 2 * w))
    end
    return
  end
  local ttl = redis.call('PTTL', kk)
  if ttl < want then
    redis.call('PEXPIRE', kk, want_arg)
  end
  if ttl ~= -1 then
    redis.call('HDEL', kk, int(start - 2 * w))
  end
end

-- The decision being applied (reused from one decision to the next): per
-- hit i its key (a fixed window: also its window's key) and rule; per key
-- the state the decision found (fx, fy), the state in Redis now (bx, by)
-- and the state as the decision has changed it (cx, cy).
local key, wkey, alg, limit, window, burst, hits, enforced, start, allowed = {}, {}, {}, {}, {}, {}, {}, {}, {}, {}
local fx, fy, bx, by, cx, cy = {}, {}, {}, {}, {}, {}
local over = {}

-- The reply, reused from call to call (Redis has read the last one by the
-- next): `filled` integers of this call's so far, and `high` the most any
-- call may have written (raised before a group writes, so even a call that
-- failed half-way left nothing past it).
local reply, filled, high = {}, 0, 0

-- Makes room for `n` more integers in the reply; returns where they start.
local function claim(n)
  local r = filled
  filled = r + n
  if filled > high then
    high = filled
  end
  return r
end

local function load(i)
  local kk = key[i]
  if fx[kk] ~= nil then
    return
  end
  local v1, v2 = 0, 0
  if alg[i] == FW then
    v1 = tonumber(redis.call('GET', wkey[i])) or 0
  elseif alg[i] == SW then
    local got = redis.call('HMGET', kk, int(start[i]), int(start[i] - window[i]))
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
      'PX', int(math.max(1, expires - now) + ttl_extra(window[i])))
  elseif alg[i] == FW then
    redis.call('INCRBY', wkey[i], int(cx[kk] - bx[kk]))
    if bx[kk] == 0 then
      redis.call('PEXPIRE', wkey[i], int(start[i] + window[i] - now + ttl_extra(window[i])))
    end
  else
    redis.call('HINCRBY', kk, int(start[i]), int(cx[kk] - bx[kk]))
    if bx[kk] == 0 then
      first_hit(kk, start[i], window[i])
    end
  end
  bx[kk], by[kk] = cx[kk], cy[kk]
end

-- Applies one decision (mode, `count` hits at argument `a`, keys after
-- `k`) in the general way, appending its answer to `reply`.
local function decide(keys, argv, mode, count, k, a)
  -- A call that failed half-way (a command's error aborts it) may have
  -- left its keys here.
  for i = 1, count do
    local kk = keys[k + i]
    fx[kk], fy[kk], bx[kk], by[kk], cx[kk], cy[kk] = nil, nil, nil, nil, nil, nil
  end
  for i = 1, count do
    local b = a + (i - 1) * ARGS_PER_HIT
    key[i] = keys[k + i]
    alg[i] = num(argv[b])
    limit[i] = num(argv[b + 1])
    window[i] = num(argv[b + 2])
    burst[i] = num(argv[b + 3])
    hits[i] = num(argv[b + 4])
    enforced[i] = argv[b + 5] == '1'
    if alg[i] ~= TB then
      start[i] = now - (now % window[i])
    end
    if alg[i] == FW then
      wkey[i] = window_key(key[i], window_number(start[i], window[i]))
    end
  end

  if mode == 0 then
    -- Independent: each hit on its own, written as it goes.
    for i = 1, count do
      load(i)
      allowed[i] = judge(i, hits[i])
      write(i)
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

  local r = claim(count * 3)
  for i = 1, count do
    local kk = key[i]
    local flag = 0
    if allowed[i] then
      flag = 1
    end
    reply[r + 1], reply[r + 2], reply[r + 3] = flag, fx[kk], fy[kk]
    r = r + 3
  end
  -- Forget this decision's keys: the next decision starts clean.
  for i = 1, count do
    local kk = key[i]
    fx[kk], fy[kk], bx[kk], by[kk], cx[kk], cy[kk] = nil, nil, nil, nil, nil, nil
  end
end

-- A run of `count` one-hit decisions at keys after `k`, all with window
-- `w_arg` and hits `n_arg`, windowed for `expected` (a window number): one
-- INCRBY each (and a PEXPIRE for a window's first hit), appended to
-- `reply`. The arguments go back to Redis as the strings they came as. When
-- `now` is in the expected window (nearly always) the keys are used as they
-- came: no string is built per hit.
local function run(keys, k, count, w_arg, n_arg, expected)
  local w, n = num(w_arg), num(n_arg)
  local start = now - (now % w)
  local field = window_number(start, w)
  local ttl = int(start + w - now + ttl_extra(w))
  local r = claim(count)
  for i = k + 1, k + count do
    local kk = keys[i]
    if field ~= expected then
      kk = window_key(string.sub(kk, 1, #kk - #expected - 1), field)
    end
    local after = redis.call('INCRBY', kk, n_arg)
    r = r + 1
    reply[r] = after
    if after == n then
      redis.call('PEXPIRE', kk, ttl)
    end
  end
end

local function decide_all(keys, argv)
  if argv[1] ~= '' then
    now = tonumber(argv[1])
  else
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  -- The jitter is drawn afresh per call: remembering it would only fill
  -- the memo.
  jitter, grace = tonumber(argv[2]), num(argv[3])
  filled = 0
  reply[claim(1) + 1] = now
  local k = 0 -- keys used so far
  local a = 4 -- next argument
  local last = #argv

  while a <= last do
    local kind = num(argv[a])
    local count = num(argv[a + 1])
    if kind == RUN then
      run(keys, k, count, argv[a + 2], argv[a + 3], argv[a + 4])
      a = a + 5
    else
      decide(keys, argv, kind, count, k, a + 2)
      a = a + 2 + count * ARGS_PER_HIT
    end
    k = k + count
  end
  -- What an earlier, longer reply held past this one's end goes.
  for i = filled + 1, high do
    reply[i] = nil
  end
  high = filled
  return reply
end
