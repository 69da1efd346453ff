-- Fixed window aligned to the Unix epoch: the twin of
-- src/algorithm/fixed_window.rs, line for line.
--
-- state:   {window_start_ms, count, 0}; an absent key is {0, 0, 0}
-- returns: {allowed, remaining, reset_after, retry_after (-1: none),
--           admitted = {state, expires_at}, rejected = {state, expires_at} or nil}
local function fixed_window(limit, window, burst, state, hits, now)
  local window_start = now - (now % window)
  local window_end = window_start + window
  local count = 0
  if state[1] == window_start then
    count = state[2]
  end
  local after = math.min(count + hits, COUNT_CAP)
  local allowed = after <= limit
  local remaining = 0
  if allowed then
    remaining = limit - after
  end
  local reset_after = window_end - now
  local retry_after = -1
  if (not allowed) and hits <= limit then
    retry_after = reset_after
  end
  local stored = { state = { window_start, after, 0 }, expires_at = window_end }
  return {
    allowed = allowed,
    remaining = remaining,
    reset_after = reset_after,
    retry_after = retry_after,
    admitted = stored,
    rejected = stored,
  }
end
