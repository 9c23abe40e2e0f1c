-- Record the line a worker in isolate mode is about to generate ('' clears it). Returns 1, or 0 if the
-- caller lost the lease.
-- KEYS[1] job shards hash
-- ARGV[1] shard index   ARGV[2] token   ARGV[3] line number or ''
local sh = get_shard(KEYS[1], ARGV[1])
if not sh or sh.state ~= 'leased' or sh.token ~= tonumber(ARGV[2]) then return 0 end
if ARGV[3] == '' then sh.in_flight = nil else sh.in_flight = tonumber(ARGV[3]) end
put_shard(KEYS[1], ARGV[1], sh)
return 1
