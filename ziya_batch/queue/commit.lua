-- Commit a shard: compare-and-set on the fencing token, so only the current owner's output counts.
-- Returns {1, job state} or {0, reason}. Idempotent: the same commit again (its token and attempt, as a worker sends
-- it after a reply it never got: Redis killed or the connection cut after the commit ran) answers {1, job state}
-- and changes nothing; refusing it would have the worker discard the parts Redis holds committed.
-- KEYS[1] job hash   KEYS[2] job shards hash   KEYS[3] job leased zset   KEYS[4] global leases zset
-- KEYS[5] job progress zset   KEYS[6] job credit hash   KEYS[7] ready zset
-- ARGV[1] job_id   ARGV[2] shard index   ARGV[3] token   ARGV[4] stats JSON   ARGV[5] worker_id
-- ARGV[6] leases member
local sh = get_shard(KEYS[2], ARGV[2])
if not sh then return {0, 'unknown shard'} end
local st = cjson.decode(ARGV[4])
if sh.state == 'committed' and sh.committed_token == tonumber(ARGV[3]) and type(st.attempt) == 'string'
    and st.attempt ~= '' and type(sh.stats) == 'table' and sh.stats.attempt == st.attempt then
  return {1, redis.call('HGET', KEYS[1], 'state')}
end
if sh.state ~= 'leased' then return {0, 'shard is ' .. sh.state} end
if sh.token ~= tonumber(ARGV[3]) then return {0, 'token ' .. ARGV[3] .. ' superseded by ' .. sh.token} end
local now = now_ms()
shard_to(KEYS[1], sh, 'committed')
sh.stats = st
sh.committed_token = sh.token
sh.committed_ms = now           -- uncommit.lua waits out the promotes of this commit from here
sh.owner = nil
sh.in_flight = nil
sh.lease_isolate = nil
-- a commit of a shard that read its input: the job's stores answered it (requeue.lua's storage series count these;
-- a dead-lettered shard's lines written without reading its input back are no such sign)
if not sh.no_read_back then
  redis.call('HINCRBY', KEYS[1], 'read_commits', 1)
  redis.call('HSET', KEYS[1], 'read_commit_ms', int(now))
end
end_storage_series(sh)
sh.no_read_back = nil
put_shard(KEYS[2], ARGV[2], sh)
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('ZREM', KEYS[4], ARGV[6])
add_stats(KEYS[1], st)
-- live rate: count what add_progress has not already counted for this worker
local tokens = st.output_tokens or 0
local prompts = (st.prompts_done or 0) + (st.prompts_failed or 0)
local ct = tonumber(redis.call('HGET', KEYS[6], ARGV[5] .. ':t') or '0')
local cp = tonumber(redis.call('HGET', KEYS[6], ARGV[5] .. ':p') or '0')
local new_t, new_p = math.max(0, tokens - ct), math.max(0, prompts - cp)
if ct > 0 or cp > 0 then
  redis.call('HSET', KEYS[6], ARGV[5] .. ':t', int(math.max(0, ct - tokens)), ARGV[5] .. ':p', int(math.max(0, cp - prompts)))
end
if new_t > 0 or new_p > 0 then
  local seq = redis.call('HINCRBY', KEYS[1], 'progress_seq', 1)
  redis.call('ZADD', KEYS[5], int(now), int(now) .. ':' .. seq .. ':' .. int(new_p) .. ':' .. int(new_t))
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', int(now - 300000))
end
return {1, settle_job(KEYS[1], KEYS[7], ARGV[1], now)}
