-- One RLQS report batch: records a member's demand per bucket, drops stale
-- members, and returns every live member of each bucket. All keys of a
-- domain share one hash tag, so this is one call on one slot.
--
-- KEYS[1]      the domain's "born" key (when its registry state began)
-- KEYS[2..]    one hash per bucket: member -> "demand allowed_rate held seen_ms"
-- ARGV[1]      member id
-- ARGV[2]      stale_ms: members older than this are dropped
-- ARGV[3]      learning_ms: the registry is learning this long after birth
-- ARGV[4]      now in ms, or "" to read Redis TIME (tests inject it)
-- ARGV[5+3i]   demand of bucket i (per second, "-1" = not measured)
-- ARGV[6+3i]   allowed rate of bucket i (per second)
-- ARGV[7+3i]   share the member holds in bucket i (per second; "-1" keeps
--              the recorded one: a client reconnecting under its id)
--
-- Returns { learning (0/1), { id, demand, rate, held, id, ... } per bucket }

local now
if ARGV[4] == "" then
  local t = redis.call("TIME")
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[4])
end
local member = ARGV[1]
local stale = tonumber(ARGV[2])
local learning_ms = tonumber(ARGV[3])
-- The born key outlives every member by a wide margin; when it is gone, the
-- state is gone, and a new learning period starts.
local keep = stale * 20

local born = tonumber(redis.call("GET", KEYS[1]))
if born == nil then
  born = now
  redis.call("SET", KEYS[1], born, "PX", keep)
else
  redis.call("PEXPIRE", KEYS[1], keep)
end
local learning = 0
if now - born < learning_ms then
  learning = 1
end

local out = {}
for i = 2, #KEYS do
  local key = KEYS[i]
  local demand = ARGV[5 + 3 * (i - 2)]
  local rate = ARGV[6 + 3 * (i - 2)]
  local held = ARGV[7 + 3 * (i - 2)]
  if held == "-1" then
    held = "0"
    local entry = redis.call("HGET", key, member)
    if entry then
      held = string.match(entry, "^%S+ %S+ (%S+) %S+$") or "0"
    end
  end
  redis.call("HSET", key, member, demand .. " " .. rate .. " " .. held .. " " .. now)
  local all = redis.call("HGETALL", key)
  local live = {}
  for j = 1, #all, 2 do
    local d, r, h, seen = string.match(all[j + 1], "^(%S+) (%S+) (%S+) (%S+)$")
    if seen == nil or now - tonumber(seen) > stale then
      redis.call("HDEL", key, all[j])
    else
      live[#live + 1] = all[j]
      live[#live + 1] = d
      live[#live + 1] = r
      live[#live + 1] = h
    end
  end
  redis.call("PEXPIRE", key, stale)
  out[#out + 1] = live
end
return { learning, out }
