-- Renew a lease if the caller still holds it (same fencing token, shard still leased). Returns 1 or 0.
-- KEYS[1] job hash   KEYS[2] job shards hash   KEYS[3] job leased zset   KEYS[4] global leases zset
-- ARGV[1] shard index   ARGV[2] token   ARGV[3] leases member
local sh = get_shard(KEYS[2], ARGV[1])
if not sh or sh.state ~= 'leased' or sh.token ~= tonumber(ARGV[2]) then return 0 end
local expiry = int(now_ms() + hnum(KEYS[1], 'lease_ms'))
redis.call('ZADD', KEYS[3], expiry, ARGV[1])
redis.call('ZADD', KEYS[4], expiry, ARGV[3])
return 1
