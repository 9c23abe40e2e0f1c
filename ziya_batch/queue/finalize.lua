-- Elect one finalizer for a job in finalizing. The election expires, so a finalizer that died is
-- replaced. Returns 1 for the winner, 0 otherwise.
-- KEYS[1] job hash   KEYS[2] job finalizer string
-- ARGV[1] caller id   ARGV[2] election ttl_ms
if redis.call('HGET', KEYS[1], 'state') ~= 'finalizing' then return 0 end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
