-- Move a job to completed or failed (checked against the transition table). Returns the old state.
-- KEYS[1] job hash   KEYS[2] ready zset   KEYS[3] job finalizer string
-- ARGV[1] job_id   ARGV[2] target state   ARGV[3] message (failed) or ''
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return false end
local now = now_ms()
job_to(KEYS[1], state, ARGV[2], now)
if ARGV[2] == 'completed' or ARGV[2] == 'failed' or ARGV[2] == 'cancelled' then
  redis.call('HSET', KEYS[1], 'finished_ms', int(now))
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('DEL', KEYS[3])
end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[3]) end
return state
