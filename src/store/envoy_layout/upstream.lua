-- ratekeeper's decisions on envoyproxy/ratelimit's keys, for the decisions
-- upstream has no plain commands for: ShouldAllow's all-or-nothing and dry
-- runs, and the stop-increment mode. The keys are upstream's fixed-window
-- counters (plain integers), read with GET and written as upstream writes
-- them (INCRBY, then EXPIRE), so instances of both kinds count in them
-- together; being one script, the decision is atomic. The Rust batch
-- semantics (src/algorithm/batch.rs) are the spec: this code decides and
-- writes; Rust recomputes each answer from the counts returned here and
-- checks that it decides alike.
--
-- KEYS      every hit's key, in request order (a key may repeat)
-- ARGV[1]   the mode: 1 all-or-nothing, 2 dry run, 3 count only the
--           over-limit hits when any is over
-- then four per hit: hits, limit, enforced (1/0), TTL in seconds
--
-- Returns two integers per hit: allowed (1/0), and the count its key had
-- before this decision.

local mode = tonumber(ARGV[1])
local found, count, allowed, over = {}, {}, {}, {}

for _, k in ipairs(KEYS) do
  if found[k] == nil then
    found[k] = tonumber(redis.call('GET', k)) or 0
  end
end

-- Judges every hit in order from the found counts, hit i counting
-- hits_of(i) (rejected hits count too, as upstream's do); returns whether
-- every enforced hit was allowed.
local function judge(hits_of)
  for k, v in pairs(found) do
    count[k] = v
  end
  local all = true
  for i, k in ipairs(KEYS) do
    local a = 2 + (i - 1) * 4
    count[k] = count[k] + hits_of(i)
    allowed[i] = count[k] <= tonumber(ARGV[a + 1])
    if not allowed[i] and ARGV[a + 2] == '1' then
      all = false
    end
  end
  return all
end

local function hits(i)
  return tonumber(ARGV[2 + (i - 1) * 4])
end

local function over_hits(i)
  if over[i] then
    return hits(i)
  end
  return 0
end

-- Counts hit i as upstream does; a hit of 0 writes nothing.
local function write(i, n)
  if n > 0 then
    local a = 2 + (i - 1) * 4
    -- A string, not a Lua number: Redis would print that with a float
    -- conversion (see src/store/redis/ratekeeper.lua, `int`).
    redis.call('INCRBY', KEYS[i], string.format('%d', n))
    redis.call('EXPIRE', KEYS[i], ARGV[a + 3])
  end
end

local all = judge(hits)
if mode == 1 and all then
  for i = 1, #KEYS do
    write(i, hits(i))
  end
elseif mode == 3 then
  local any_over = false
  for i = 1, #KEYS do
    over[i] = not allowed[i]
    any_over = any_over or over[i]
  end
  local counted = hits
  if any_over then
    counted = over_hits
    judge(over_hits)
  end
  for i = 1, #KEYS do
    write(i, counted(i))
  end
end

local reply = {}
for i, k in ipairs(KEYS) do
  local flag = 0
  if allowed[i] then
    flag = 1
  end
  reply[2 * i - 1] = flag
  reply[2 * i] = found[k]
end
return reply
