-- Renew a lease if the caller still holds it (same fencing token, shard still leased). Returns 1 or 0.
-- The lease runs for the job's lease_ms, but never less than the caller's (the one it claimed with, whose third
-- it renews at): a job resubmitted with a shorter lease must not expire leases between their renewals.
-- KEYS[1] job hash   KEYS[2] job shards hash   KEYS[3] job leased zset   KEYS[4] global leases zset
-- ARGV[1] shard index   ARGV[2] token   ARGV[3] leases member   ARGV[4] the caller's lease, ms (optional)
local sh = get_shard(KEYS[2], ARGV[1])
if not sh or sh.state ~= 'leased' or sh.token ~= tonumber(ARGV[2]) then return 0 end
local expiry = int(now_ms() + math.max(hnum(KEYS[1], 'lease_ms'), tonumber(ARGV[4] or '0') or 0))
redis.call('ZADD', KEYS[3], expiry, ARGV[1])
redis.call('ZADD', KEYS[4], expiry, ARGV[3])
return 1
