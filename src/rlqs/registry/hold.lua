-- Records the share an RLQS member now holds in some buckets, keeping its
-- demand, rate and last-seen time (a member the exchange has not written,
-- or that went stale, is left alone).
--
-- KEYS[1..]  bucket hashes (see exchange.lua), all of one domain's hash tag
-- ARGV[1]    member id
-- ARGV[2]    stale_ms (the hashes' expiry)
-- ARGV[2+i]  the share held in KEYS[i], per second

local member = ARGV[1]
for i = 1, #KEYS do
  local entry = redis.call("HGET", KEYS[i], member)
  if entry then
    local d, r, _, seen = string.match(entry, "^(%S+) (%S+) (%S+) (%S+)$")
    if seen then
      redis.call("HSET", KEYS[i], member, d .. " " .. r .. " " .. ARGV[2 + i] .. " " .. seen)
      redis.call("PEXPIRE", KEYS[i], ARGV[2])
    end
  end
end
return 0
