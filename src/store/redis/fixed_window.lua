-- Fixed window aligned to the Unix epoch: the twin of
-- src/algorithm/fixed_window.rs, line for line.
--
-- state:   s1 = window_start_ms, s2 = count (s3 unused); absent = 0, 0, 0
-- returns: allowed, remaining, reset_after, retry_after (-1: none),
--          the admitted state (three numbers and its expiry), and whether a
--          rejection writes that same state (it does: rejected hits count)
local function fixed_window(limit, window, burst, s1, s2, s3, hits, now)
  local start, _, until_end, stored = align(now, window, s1)
  local count = 0
  if stored == STORED_CURRENT then
    count = math.min(s2, COUNT_CAP)
  end
  local after = math.min(count + hits, COUNT_CAP)
  local allowed = after <= limit
  local remaining = 0
  if allowed then
    remaining = limit - after
  end
  local retry_after = -1
  if (not allowed) and hits <= limit then
    retry_after = until_end
  end
  return allowed, remaining, until_end, retry_after, start, after, 0, start + window, true
end
