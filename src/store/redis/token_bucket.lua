-- Token bucket (GCRA, bucket-level form): the twin of
-- src/algorithm/token_bucket.rs, line for line. One token is `window` units;
-- the level drains `limit` units per millisecond. A level above today's
-- capacity reads as an empty bucket.
--
-- state:   s1 = level, s2 = measured_at_ms (s3 unused); absent = 0, 0, 0
-- returns: as fixed_window; a rejection writes nothing
local function token_bucket(limit, window, burst, s1, s2, s3, hits, now)
  local drain_per_ms = math.max(limit, 1)
  local capacity = burst * window

  local drained = math.max(0, now - s2) * drain_per_ms
  local level = math.max(0, math.min(s1, capacity) - drained)
  local need = hits * window
  local allowed = level + need <= capacity
  local level_after = level
  if allowed then
    level_after = level + need
  end

  local retry_after = -1
  if (not allowed) and hits <= burst then
    retry_after = ceil_div(level + need - capacity, drain_per_ms)
  end
  local admitted = math.min(level + need, capacity)
  return allowed, floor_div(capacity - level_after, window), ceil_div(level_after, drain_per_ms), retry_after,
    admitted, now, 0, now + ceil_div(admitted, drain_per_ms), false
end
