-- Mid-shard progress for the live output rate. The worker's reported amounts are remembered as credit
-- that its next commits draw down, so nothing is counted twice. Returns 1, or 0 for a job this Redis does not know.
-- KEYS[1] job hash   KEYS[2] job progress zset   KEYS[3] job credit hash
-- ARGV[1] worker_id   ARGV[2] prompts   ARGV[3] output tokens
-- a job forgotten (or deleted) under a worker still at work: nothing of it is written again
if not redis.call('HGET', KEYS[1], 'state') then return 0 end
local now = now_ms()
local seq = redis.call('HINCRBY', KEYS[1], 'progress_seq', 1)
redis.call('ZADD', KEYS[2], int(now), int(now) .. ':' .. seq .. ':' .. ARGV[2] .. ':' .. ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', int(now - 300000))
redis.call('HINCRBY', KEYS[3], ARGV[1] .. ':p', ARGV[2])
redis.call('HINCRBY', KEYS[3], ARGV[1] .. ':t', ARGV[3])
return 1
