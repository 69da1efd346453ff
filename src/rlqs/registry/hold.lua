-- Claims grown RLQS shares for a member, atomically against what every
-- other member of each bucket holds: a claim gets min(wanted, pool - the
-- others' held), never below zero, and that is recorded as the member's
-- held share (per second) before ratekeeper sends it. So two instances can
-- never hand out the same room. Stale members still count (conservative).
--
-- KEYS[i]     bucket hashes (see exchange.lua), all of one domain's hash tag
-- ARGV[1]     member id
-- ARGV[2]     stale_ms (the hashes' expiry)
-- ARGV[3i]    tokens per fill wanted in KEYS[i]
-- ARGV[3i+1]  the rule's tokens per fill (the pool)
-- ARGV[3i+2]  the fill interval in seconds
--
-- Returns the tokens granted per claim.

local member = ARGV[1]
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, #KEYS do
  local wanted = tonumber(ARGV[3 * i])
  local pool = tonumber(ARGV[3 * i + 1])
  local fill = tonumber(ARGV[3 * i + 2])
  local all = redis.call("HGETALL", KEYS[i])
  local others = 0
  local d, r, seen = "-1", "0", tostring(now)
  for j = 1, #all, 2 do
    local md, mr, mh, ms = string.match(all[j + 1], "^(%S+) (%S+) (%S+) (%S+)$")
    if all[j] == member then
      if ms then
        d, r, seen = md, mr, ms
      end
    elseif mh then
      others = others + tonumber(mh) * fill
    end
  end
  local room = math.floor(pool - others + 0.000001)
  if room < 0 then
    room = 0
  end
  local grant = math.min(wanted, room)
  redis.call("HSET", KEYS[i], member, d .. " " .. r .. " " .. string.format("%.6f", grant / fill) .. " " .. seen)
  redis.call("PEXPIRE", KEYS[i], ARGV[2])
  out[i] = grant
end
return out
