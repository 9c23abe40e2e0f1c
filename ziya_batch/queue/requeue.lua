-- Take a shard back from its owner after a failure (ARGV[3] = the owner's token) or an expired lease
-- (ARGV[3] = ''; checked against the Redis clock). Returns 'retry' | 'dead', or false if the shard was
-- not the caller's to requeue (committed, re-claimed, or its lease was renewed meanwhile).
-- A line that was in flight when an isolated shard's worker died, or that the worker names, becomes a
-- bad line (dead-lettered alone) and that attempt does not count against the shard's retry limit: the
-- shard made progress. Otherwise the failure counts; past max_retries the shard is dead-lettered.
-- KEYS[1] job hash   KEYS[2] job shards hash   KEYS[3] job pending zset   KEYS[4] job leased zset
-- KEYS[5] global leases zset   KEYS[6] job dead set   KEYS[7] job errors list   KEYS[8] ready zset
-- KEYS[9] claim sequence counter
-- ARGV[1] job_id  ARGV[2] shard index  ARGV[3] token or ''  ARGV[4] message  ARGV[5] bad line or ''
-- ARGV[6] backoff_base_ms  ARGV[7] backoff_max_ms  ARGV[8] errors to keep  ARGV[9] leases member
-- ARGV[10] worker_id (for the error record)
-- ARGV[11] '1': given back, not failed; 'storage': given back because its storage did not answer (optional)
-- ARGV[12] ms a shard's storage give-backs stay free after the first of its series (optional: 0)
-- ARGV[13] ms from the first of its series before a dead-lettered shard gives up reading its input back for its
-- lines' ids (optional: 0)
-- ARGV[14] ms a shard may sit untried after a storage give-back and its next one still go on from it (optional: 0,
-- no limit)
-- ARGV[15] the Redis time (ms) this server started (optional: 0, unknown): an expired lease is taken back only once
-- the server has been up for the job's lease_ms. While it was down (killed, restarted from an AOF that may have lost
-- the last renewals too) no owner could renew, so a lease that ran out meanwhile says nothing about its owner: each
-- gets one whole lease from the start to renew before its shard counts as failed.
-- A shard given back (its worker could not load the job's engine, or no longer serves the job's spec) did not
-- fail: its lines were not tried, so the attempt does not count, the shard is not isolated, and it waits only
-- backoff_base_ms before another claim.
-- A storage give-back ('storage': the shard's store did not answer) is one too, unless all of these hold, and then
-- it counts as a failed try (up to dead-letter), the store evidently answering and the failure the shard's own (a
-- time-out on its one huge range, an error of its one object):
--   * the job committed shards that read their input (read_commits) since the first storage give-back of the
--     shard's series (storage_commits: read_commits then; a dead-lettered shard written without reading its input
--     back is no such commit); a commit of the shard, or a try of it that fails on its own, ends the series;
--   * ARGV[12] ms have passed since that first one (storage_since; moved to now where the shard sat untried for
--     ARGV[14] ms since its last one, storage_last): an outage of the input's store alone, while shards past their
--     reads commit, costs nothing for that long;
--   * no other shard of the job has had a storage give-back since the job's last such commit (storage_fail_*,
--     read_commit_ms): the store is not failing others too (an outage, of any length).
-- A counted give-back keeps the series open, so a shard that fails after every other shard has committed is bounded
-- too. A dead-lettered shard's one (its input read back for its lines' ids) counts only once ARGV[13] ms have passed
-- since storage_since as well, and then sets no_read_back: its error lines are written numbered FILE:LINE.
local sh = get_shard(KEYS[2], ARGV[2])
if not sh or sh.state ~= 'leased' then return false end
local now = now_ms()
local expired = ARGV[3] == ''
if expired then
  local expiry = redis.call('ZSCORE', KEYS[4], ARGV[2])
  if expiry and tonumber(expiry) > now then return false end
  local started = tonumber(ARGV[15] or '') or 0
  if started > 0 and now < started + hnum(KEYS[1], 'lease_ms') then return false end
elseif sh.token ~= tonumber(ARGV[3]) then
  return false
end
local bad = nil
if ARGV[5] ~= '' then
  bad = tonumber(ARGV[5])
elseif expired and sh.lease_isolate and sh.in_flight then
  bad = sh.in_flight
end
local new_bad = false
if bad then
  local known = false
  for _, b in ipairs(sh.bad_lines or {}) do
    if b == bad then known = true end
  end
  if not known then
    if type(sh.bad_lines) ~= 'table' or next(sh.bad_lines) == nil then sh.bad_lines = {} end
    table.insert(sh.bad_lines, bad)
    new_bad = true
    redis.call('HINCRBY', KEYS[1], 'dead_lines', 1)
  end
end
local given_back = ARGV[11] == '1' or ARGV[11] == 'storage'
local message = utf8_head(ARGV[4], 2000)
if not given_back and not expired then
  -- a try that failed on its own (a line, the engine, an input that changed) got past its storage: a storage
  -- give-back after it starts a new series (an expiry proves nothing: a worker stuck on its store expires too)
  end_storage_series(sh)
end
if ARGV[11] == 'storage' then
  local job = redis.call('HMGET', KEYS[1], 'read_commits', 'read_commit_ms', 'storage_fail_ms', 'storage_fail_shard',
                         'storage_fail_other_ms')
  local committed = tonumber(job[1] or '0') or 0
  -- the latest storage give-back of another shard of the job (storage_fail_ms / _shard: the latest of any;
  -- storage_fail_other_ms: the latest of a shard other than that one): where it came after the job's last commit
  -- of a shard that read its input, the store is failing others too, and this give-back is an outage's, not the
  -- shard's own
  local idx = tostring(ARGV[2])
  local last_ms, last_shard = tonumber(job[3] or '0') or 0, job[4]
  local other_ms = last_ms
  if last_shard == idx then other_ms = tonumber(job[5] or '0') or 0 end
  local others_fail = other_ms > 0 and other_ms >= (tonumber(job[2] or '0') or 0)
  if last_shard ~= idx then redis.call('HSET', KEYS[1], 'storage_fail_other_ms', int(last_ms)) end
  redis.call('HSET', KEYS[1], 'storage_fail_ms', int(now), 'storage_fail_shard', idx)
  local gap = tonumber(ARGV[14]) or 0
  if sh.storage_commits ~= nil and gap > 0 and
      (sh.claimed_ms or now) - (sh.storage_last or sh.storage_since or 0) > gap then
    sh.storage_since = now          -- untried meanwhile: the grace starts again (the series' commits still count)
  end
  local first = sh.storage_commits == nil
  sh.storage_last = now
  if first then
    sh.storage_commits = committed
    sh.storage_since = now
  elseif committed > sh.storage_commits and not others_fail and
      now - (sh.storage_since or 0) >= (tonumber(ARGV[12]) or 0) then
    -- a dead-lettered shard's read-back for its lines' ids: given back (ids kept, once the store answers) until
    -- ARGV[13] has passed too, then counted and written without it (FILE:LINE ids) rather than given back for ever
    if not sh.dead or now - (sh.storage_since or 0) >= (tonumber(ARGV[13]) or 0) then
      given_back = false
      if sh.dead then sh.no_read_back = true end
      message = message .. ' (counted as a failed try: the job committed other shards since storage first did ' ..
        'not answer for this one)'
    end
  end
end
if not new_bad and not given_back then sh.failures = (sh.failures or 0) + 1 end
if not given_back then sh.isolate = true end
local was_dead = sh.dead
local target = 'pending'
if was_dead then
  target = 'dead'
elseif not given_back and sh.failures > hnum(KEYS[1], 'max_retries') then
  target = 'dead'
  sh.dead = true
  redis.call('SADD', KEYS[6], ARGV[2])
end
local not_before = now
if given_back then
  not_before = now + tonumber(ARGV[6])
elseif not new_bad and not (target == 'dead' and not was_dead) then
  local base, cap = tonumber(ARGV[6]), tonumber(ARGV[7])
  not_before = now + math.min(cap, base * 2 ^ math.max(0, sh.failures - 1))
end
shard_to(KEYS[1], sh, target)
local owner, attempt, token = sh.owner, sh.attempts, sh.token
sh.owner = nil
sh.in_flight = nil
sh.lease_isolate = nil
put_shard(KEYS[2], ARGV[2], sh)
redis.call('ZREM', KEYS[4], ARGV[2])
redis.call('ZREM', KEYS[5], ARGV[9])
redis.call('ZADD', KEYS[3], int(not_before), ARGV[2])
if not given_back then redis.call('HINCRBY', KEYS[1], 'retries', 1) end
if expired then redis.call('HINCRBY', KEYS[1], 'lease_expiries', 1) end
local outcome = 'retry'
if target == 'dead' then outcome = 'dead' end
local entry = {ts_ms = now, shard = tonumber(ARGV[2]), token = token, attempt = attempt,
  worker_id = owner or ARGV[10], reason = expired and 'lease expired' or (given_back and 'given back' or 'failed'),
  message = message, outcome = outcome}
if bad then entry.bad_line = bad end
redis.call('LPUSH', KEYS[7], cjson.encode(entry))
redis.call('LTRIM', KEYS[7], 0, tonumber(ARGV[8]) - 1)
local state = settle_job(KEYS[1], KEYS[8], ARGV[1], now)
if state == 'queued' or state == 'running' then
  ready_add(KEYS[8], KEYS[9], KEYS[1], ARGV[1], true)
end
return outcome
