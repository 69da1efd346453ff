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
