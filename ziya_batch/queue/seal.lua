-- Mark a job's shard list complete and make it claimable (or finalizing if every shard is committed).
-- Returns the job's state.
-- KEYS[1] job hash   KEYS[2] ready zset   KEYS[3] claim sequence counter
-- ARGV[1] job_id
local now = now_ms()
local state = redis.call('HGET', KEYS[1], 'state')
if not state or redis.call('HGET', KEYS[1], 'sealed') == '1' then return state end
redis.call('HSET', KEYS[1], 'sealed', '1')
state = settle_job(KEYS[1], KEYS[2], ARGV[1], now)
if state == 'queued' or state == 'running' then
  ready_add(KEYS[2], KEYS[3], KEYS[1], ARGV[1], false)
end
return state
