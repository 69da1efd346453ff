-- Shared constants of the ratekeeper scripts. Loaded first; the algorithm
-- files and batch.lua follow it in one script (see src/store/redis.rs).

-- Twin of algorithm::COUNT_CAP: counts saturate here so that doubles stay exact.
local COUNT_CAP = 1125899906842624 -- 2^50
