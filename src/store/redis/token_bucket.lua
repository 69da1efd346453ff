-- Token bucket (GCRA, bucket-level form): the twin of
-- src/algorithm/token_bucket.rs, line for line. One token is `window` units;
-- the level drains `limit` units per millisecond.
--
-- state:   {level, measured_at_ms, 0}; an absent key is {0, 0, 0}
-- returns: as fixed_window; rejected hits take no tokens (rejected = nil)
local function token_bucket(limit, window, burst, state, hits, now)
  local drain_per_ms = math.max(limit, 1)
  local capacity = burst * window

  local drained = math.max(0, now - state[2]) * drain_per_ms
  local level = math.max(0, state[1] - drained)
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
  return {
    allowed = allowed,
    remaining = floor_div(capacity - level_after, window),
    reset_after = ceil_div(level_after, drain_per_ms),
    retry_after = retry_after,
    admitted = { state = { admitted, now, 0 }, expires_at = now + ceil_div(admitted, drain_per_ms) },
    rejected = nil,
  }
end
