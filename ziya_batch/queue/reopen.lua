-- Reopen a failed or cancelled job that is submitted again: dead-lettered shards not yet written get a
-- fresh set of retries, and the job is claimable again (or finalizing if all shards are committed).
-- Returns the job's state.
-- KEYS[1] job hash   KEYS[2] job shards hash   KEYS[3] job pending zset   KEYS[4] job dead set
-- KEYS[5] ready zset   KEYS[6] claim sequence counter   KEYS[7] job finalizer string
-- ARGV[1] job_id
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'failed' and state ~= 'cancelled' then return state end
local now = now_ms()
for _, idx in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  local sh = get_shard(KEYS[2], idx)
  if sh and sh.state == 'dead' then
    shard_to(KEYS[1], sh, 'pending')
    sh.dead = nil
    sh.failures = 0
    end_storage_series(sh)
    sh.no_read_back = nil
    put_shard(KEYS[2], idx, sh)
    redis.call('ZADD', KEYS[3], idx, idx)
    redis.call('SREM', KEYS[4], idx)
  end
end
redis.call('HDEL', KEYS[1], 'error', 'finished_ms')
redis.call('DEL', KEYS[7])
if redis.call('HGET', KEYS[1], 'sealed') == '1' and hnum(KEYS[1], 'n_committed') == hnum(KEYS[1], 'total_shards') then
  job_to(KEYS[1], state, 'finalizing', now)
else
  job_to(KEYS[1], state, 'queued', now)
  ready_add(KEYS[5], KEYS[6], KEYS[1], ARGV[1], false)
end
return redis.call('HGET', KEYS[1], 'state')
