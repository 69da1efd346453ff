-- Sliding window (weighted two-window counter): the twin of
-- src/algorithm/sliding_window.rs, line for line.
--
-- state:   s1 = window_start_ms, s2 = current, s3 = previous; absent = 0, 0, 0
-- returns: as fixed_window; a rejection writes nothing
local function sliding_window(limit, window, burst, s1, s2, s3, hits, now)
  local start, elapsed, until_end, stored = align(now, window, s1)
  local current, previous = 0, 0
  if stored == STORED_CURRENT then
    current, previous = s2, s3
  elseif stored == STORED_PREVIOUS then
    previous = s2
  end

  local capacity = limit * window
  local used = previous * (window - elapsed) + current * window
  local need = hits * window
  local allowed = used + need <= capacity
  local current_after, used_after = current, used
  if allowed then
    current_after, used_after = current + hits, used + need
  end

  local retry_after = -1
  if allowed or hits > limit then
    retry_after = -1
  elseif current + hits <= limit then
    local spare = (limit - current - hits) * window
    retry_after = until_end - floor_div(spare, previous)
  else
    local spare = (limit - hits) * window
    local into_next = math.max(0, window - floor_div(spare, current))
    retry_after = until_end + into_next
  end

  local reset_at, expires_at = start + window, start + window
  if current_after > 0 then
    reset_at = start + 2 * window
  end
  if current + hits > 0 then
    expires_at = start + 2 * window
  end
  return allowed, floor_div(math.max(0, capacity - used_after), window), reset_at - now, retry_after,
    start, current + hits, previous, expires_at, false
end
