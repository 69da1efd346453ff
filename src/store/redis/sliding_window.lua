-- Sliding window (weighted two-window counter): the twin of
-- src/algorithm/sliding_window.rs, line for line.
--
-- state:   {window_start_ms, current, previous}; an absent key is {0, 0, 0}
-- returns: as fixed_window; rejected hits are not counted (rejected = nil)
local function sliding_window(limit, window, burst, state, hits, now)
  local start = now - (now % window)
  local elapsed = now - start
  local current, previous = 0, 0
  if state[1] == start then
    current, previous = state[2], state[3]
  elseif state[1] + window == start then
    current, previous = 0, state[2]
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
    retry_after = (window - elapsed) - floor_div(spare, previous)
  else
    local spare = (limit - hits) * window
    local into_next = math.max(0, window - floor_div(spare, current))
    retry_after = (window - elapsed) + into_next
  end

  local function expires_at(count)
    if count > 0 then
      return start + 2 * window
    end
    return start + window
  end
  return {
    allowed = allowed,
    remaining = floor_div(math.max(0, capacity - used_after), window),
    reset_after = expires_at(current_after) - now,
    retry_after = retry_after,
    admitted = { state = { start, current + hits, previous }, expires_at = expires_at(current + hits) },
    rejected = nil,
  }
end
