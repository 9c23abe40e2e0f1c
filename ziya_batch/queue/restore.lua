-- Record a job that this Redis does not know as completed, from the manifest its finalizer wrote (the job was
-- forgotten, or Redis lost it): its totals, and no shard records, since every shard is committed and a completed job
-- is never claimed, reopened or taken back. Nothing is written where the job exists. Returns the job's state as it
-- is now: 'completed' for a job this call recorded.
-- KEYS[1] job hash   KEYS[2] job spec string   KEYS[3] zset of all jobs
-- ARGV: job_id, spec_json, name, priority, lease_ms, max_retries, output_path, total_shards, prompts_done,
--       prompts_failed, samples, output_tokens, prefix_cache_query_tokens, prefix_cache_hit_tokens,
--       finished_ms (when the manifest was written; '' = now)
local state = redis.call('HGET', KEYS[1], 'state')
if state then return state end
local now = now_ms()
local finished = tonumber(ARGV[15]) or now
redis.call('HSET', KEYS[1], 'state', 'completed', 'sealed', '1', 'restored', '1', 'name', ARGV[3],
  'priority', ARGV[4], 'lease_ms', ARGV[5], 'max_retries', ARGV[6], 'output_path', ARGV[7], 'created_ms', int(now),
  'updated_ms', int(now), 'finished_ms', int(finished), 'total_shards', ARGV[8],
  'total_prompts', int(tonumber(ARGV[9]) + tonumber(ARGV[10])), 'n_pending', 0, 'n_leased', 0,
  'n_committed', ARGV[8], 'n_dead', 0, 'prompts_done', ARGV[9], 'prompts_failed', ARGV[10], 'samples', ARGV[11],
  'output_tokens', ARGV[12], 'prefix_cache_query_tokens', ARGV[13], 'prefix_cache_hit_tokens', ARGV[14],
  'retries', 0, 'dead_lines', 0)
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], int(now), ARGV[1])
return 'completed'
