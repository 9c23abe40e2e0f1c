-- Take back a commit whose staged parts storage lost before they were promoted (no commit marker), so the shard runs
-- again. Only a finalizer calls it, after discarding what is left of the attempt's staging. Compare-and-set on the
-- committed token (and attempt, where given), so a stale caller never undoes a newer commit. Refused until the
-- grace has passed since the commit (ARGV[8]): a promoter of the commit that is still at work (the worker's own
-- promote, or an earlier finalizer's) would otherwise move its parts or write its marker over the re-run's. A
-- commit recorded before commits carried their time (no committed_ms) starts its grace now.
-- The shard goes back to pending (dead if it was dead-lettered: its error lines are unwritten), claimable at once;
-- its stats come off the job's sums; each such re-run counts in the job's retries. A finalizing job is running
-- again and loses its finalizer; a failed, cancelling or cancelled job keeps its state (a resubmit's reopen runs
-- the shard); a completed one is refused (it has a marker for every shard). A shard whose parts are lost more
-- times than the job's max_retries is taken back but not run: the job fails (unless cancelled already) with a
-- message naming the staging folder, and the shard's count starts again for a resubmit.
-- Returns {1, 'retry' | 'failed', job state, times lost}, or {0, 'too recent', ms left} or {0, reason}.
-- KEYS[1] job hash   KEYS[2] job shards hash   KEYS[3] job pending zset   KEYS[4] ready zset
-- KEYS[5] claim sequence counter   KEYS[6] job finalizer string   KEYS[7] job errors list
-- ARGV[1] job_id   ARGV[2] shard index   ARGV[3] committed token   ARGV[4] attempt or ''   ARGV[5] reason
-- ARGV[6] errors to keep   ARGV[7] caller (for the error record)   ARGV[8] grace_ms
-- ARGV[9] the staging folder's URL (for the job's error)
local sh = get_shard(KEYS[2], ARGV[2])
if not sh then return {0, 'unknown shard'} end
if sh.state ~= 'committed' then return {0, 'shard is ' .. sh.state} end
if sh.committed_token ~= tonumber(ARGV[3]) then
  return {0, 'committed under token ' .. tostring(sh.committed_token) .. ', not ' .. ARGV[3]}
end
local stats = sh.stats or {}
if ARGV[4] ~= '' and stats.attempt ~= ARGV[4] then
  return {0, 'committed by attempt ' .. tostring(stats.attempt) .. ', not ' .. ARGV[4]}
end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'completed' then return {0, 'job is completed'} end
local now = now_ms()
if not sh.committed_ms then
  sh.committed_ms = now
  put_shard(KEYS[2], ARGV[2], sh)
end
local left = sh.committed_ms + tonumber(ARGV[8]) - now
if left > 0 then return {0, 'too recent', int(left)} end
local lost = (sh.lost or 0) + 1
local too_many = lost > hnum(KEYS[1], 'max_retries')
if sh.dead then shard_to(KEYS[1], sh, 'dead') else shard_to(KEYS[1], sh, 'pending') end
add_stats(KEYS[1], stats, -1)
local token = sh.committed_token
sh.stats = nil
sh.committed_token = nil
sh.committed_ms = nil
if too_many then sh.lost = nil else sh.lost = lost end
put_shard(KEYS[2], ARGV[2], sh)
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[2])
local outcome = 'retry'
if too_many then
  outcome = 'failed'
  if state ~= 'failed' and state ~= 'cancelled' then
    local times = lost == 1 and 'once' or (lost .. ' times')
    job_to(KEYS[1], state, 'failed', now)
    redis.call('HSET', KEYS[1], 'finished_ms', int(now), 'error', 'shard ' .. ARGV[2] ..
      ': its staged parts disappeared from storage ' .. times .. ' before they could be promoted; check ' ..
      'lifecycle rules or cleanup jobs on ' .. ARGV[9])
    redis.call('ZREM', KEYS[4], ARGV[1])
    redis.call('DEL', KEYS[6])
  end
else
  redis.call('HINCRBY', KEYS[1], 'retries', 1)
  if state == 'finalizing' then
    job_to(KEYS[1], state, 'running', now)
    redis.call('DEL', KEYS[6])
  end
  if state == 'queued' or state == 'running' or state == 'finalizing' then
    ready_add(KEYS[4], KEYS[5], KEYS[1], ARGV[1], true)
  end
end
local entry = {ts_ms = now, shard = tonumber(ARGV[2]), token = token, attempt = sh.attempts, worker_id = ARGV[7],
  reason = 'parts lost', message = utf8_head(ARGV[5], 2000), outcome = outcome}
redis.call('LPUSH', KEYS[7], cjson.encode(entry))
redis.call('LTRIM', KEYS[7], 0, tonumber(ARGV[6]) - 1)
return {1, outcome, redis.call('HGET', KEYS[1], 'state'), lost}
