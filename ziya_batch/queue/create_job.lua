-- Create a job's hash and spec unless the job exists. Returns {state, sealed} of the job as it is now.
-- A job that exists and has not completed takes the spec given: the job id hashes what the job writes, so a
-- spec submitted again under it differs at most in how the job runs (JobSpec RUN_FIELDS: engine settings,
-- tensor parallelism, lease, retries, priority), and the workers that start from now on use those.
-- KEYS[1] job hash   KEYS[2] job spec string   KEYS[3] zset of all jobs   KEYS[4] ready jobs zset
-- KEYS[5] claim sequence counter
-- ARGV: job_id, spec_json, name, priority, lease_ms, max_retries, output_path
local state = redis.call('HGET', KEYS[1], 'state')
if state then
  if state ~= 'completed' then
    local prio = redis.call('HGET', KEYS[1], 'priority')
    redis.call('SET', KEYS[2], ARGV[2])
    redis.call('HSET', KEYS[1], 'priority', ARGV[4], 'lease_ms', ARGV[5], 'max_retries', ARGV[6])
    if prio ~= ARGV[4] and redis.call('ZSCORE', KEYS[4], ARGV[1]) then
      ready_add(KEYS[4], KEYS[5], KEYS[1], ARGV[1], false)     -- its place among ready jobs moves with it
    end
  end
  return {state, redis.call('HGET', KEYS[1], 'sealed') or '0'}
end
local now = now_ms()
redis.call('HSET', KEYS[1], 'state', 'queued', 'sealed', '0', 'name', ARGV[3], 'priority', ARGV[4],
  'lease_ms', ARGV[5], 'max_retries', ARGV[6], 'output_path', ARGV[7], 'created_ms', int(now),
  'updated_ms', int(now), 'total_shards', 0, 'total_prompts', 0, 'n_pending', 0, 'n_leased', 0,
  'n_committed', 0, 'n_dead', 0, 'prompts_done', 0, 'prompts_failed', 0, 'samples', 0, 'output_tokens', 0,
  'retries', 0, 'dead_lines', 0)
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], int(now), ARGV[1])
return {'created', '0'}
