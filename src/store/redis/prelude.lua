-- Shared constants and helpers of the ratekeeper scripts. Loaded first; the
-- algorithm files and batch.lua follow it in one script (see src/store/redis.rs).
--
-- Every number here is an integer below 2^53, which a double (Lua's only
-- number type) holds exactly; the helpers keep divisions exact too.

-- Twin of algorithm::COUNT_CAP: counts saturate here so that doubles stay exact.
local COUNT_CAP = 1125899906842624 -- 2^50

-- floor(a / b) for integers a >= 0, b > 0, corrected for the rounding of a
-- double division.
local function floor_div(a, b)
  local q = math.floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end

-- ceil(a / b) for integers a >= 0, b > 0.
local function ceil_div(a, b)
  local q = floor_div(a, b)
  if q * b < a then
    q = q + 1
  end
  return q
end

-- Twin of algorithm::align: the window now falls in, and where the stored
-- window (starting at stored_start) stands. A stored window up to one window
-- later than now's (the clock stepped back) is evaluated from its own start,
-- counts kept; one further ahead counts as empty.
-- Returns start, elapsed, until_end and the stored window's place:
-- 0 current, 1 previous, 2 older.
local STORED_CURRENT, STORED_PREVIOUS, STORED_OLDER = 0, 1, 2
local function align(now, window, stored_start)
  local start = now - (now % window)
  if stored_start > start and stored_start - start <= window then
    return stored_start, 0, stored_start + window - now, STORED_CURRENT
  end
  local stored = STORED_OLDER
  if stored_start == start then
    stored = STORED_CURRENT
  elseif stored_start + window == start then
    stored = STORED_PREVIOUS
  end
  return start, now - start, start + window - now, stored
end
