-- Cancel a job: no claim from it from now on. With ARGV[2] = '1' its leased shards are taken back at
-- once (their owners' heartbeats and commits fail); otherwise they may finish. Returns the job's state.
-- KEYS[1] job hash   KEYS[2] job shards hash   KEYS[3] job pending zset   KEYS[4] job leased zset
-- KEYS[5] global leases zset   KEYS[6] ready zset
-- ARGV[1] job_id   ARGV[2] abandon running shards ('1' or '0')
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return false end
if state ~= 'queued' and state ~= 'running' and state ~= 'cancelling' then return state end
local now = now_ms()
redis.call('ZREM', KEYS[6], ARGV[1])
if ARGV[2] == '1' then
  for _, idx in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
    local sh = get_shard(KEYS[2], idx)
    if sh and sh.state == 'leased' then
      -- abandoned work is not a failed attempt: a reopened job runs it again without penalty
      if sh.dead then shard_to(KEYS[1], sh, 'dead') else shard_to(KEYS[1], sh, 'pending') end
      sh.owner = nil
      sh.in_flight = nil
      sh.lease_isolate = nil
      put_shard(KEYS[2], idx, sh)
      redis.call('ZADD', KEYS[3], idx, idx)
    end
    redis.call('ZREM', KEYS[5], ARGV[1] .. '|' .. idx)
  end
  redis.call('DEL', KEYS[4])
end
if state ~= 'cancelling' then job_to(KEYS[1], state, 'cancelling', now) end
return settle_job(KEYS[1], KEYS[6], ARGV[1], now)
