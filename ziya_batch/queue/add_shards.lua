-- Add a batch of shards (idempotent: a shard already present is kept), and record shards that storage
-- says are committed. Returns the number of shards added, or -1 for a job this Redis does not know.
-- KEYS[1] job hash   KEYS[2] job shards hash   KEYS[3] job pending zset   KEYS[4] ready zset
-- KEYS[5] job input files list
-- ARGV[1] job_id, then triples: shard index, shard record JSON ('' = only reconcile an existing shard),
--         committed stats JSON ('' = not committed)
-- A job forgotten (cancelled, then forgotten) while its submit streamed its shards: nothing of it is written again,
-- and the files the submit appended since (Broker._add_refs, before this) go too. Every job has a state from
-- create_job on, so a files list without one is the submit's alone.
if not redis.call('HGET', KEYS[1], 'state') then
  redis.call('UNLINK', KEYS[5])
  return -1
end
local now = now_ms()
local added = 0
for i = 2, #ARGV, 3 do
  local idx, rec, stats = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local sh = get_shard(KEYS[2], idx)
  if not sh and rec ~= '' then
    sh = cjson.decode(rec)
    sh.token = 0
    sh.attempts = 0
    sh.failures = 0
    redis.call('HINCRBY', KEYS[1], 'total_shards', 1)
    redis.call('HINCRBY', KEYS[1], 'total_prompts', sh.num_lines)
    if stats ~= '' then
      sh.state = 'committed'
      sh.stats = cjson.decode(stats)
      sh.committed_token = 0
      add_stats(KEYS[1], sh.stats)
    else
      sh.state = 'pending'
      redis.call('ZADD', KEYS[3], idx, idx)
    end
    redis.call('HINCRBY', KEYS[1], 'n_' .. sh.state, 1)
    put_shard(KEYS[2], idx, sh)
    added = added + 1
  elseif sh and stats ~= '' and (sh.state == 'pending' or sh.state == 'dead') then
    -- storage holds a committed part Redis did not know of (e.g. Redis lost its last second of writes)
    shard_to(KEYS[1], sh, 'committed')
    sh.stats = cjson.decode(stats)
    sh.committed_token = sh.token
    redis.call('ZREM', KEYS[3], idx)
    add_stats(KEYS[1], sh.stats)
    put_shard(KEYS[2], idx, sh)
  end
end
settle_job(KEYS[1], KEYS[4], ARGV[1], now)
return added
