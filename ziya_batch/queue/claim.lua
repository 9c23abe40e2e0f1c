-- Lease the first claimable shard of one job: fresh shards in index order, retried ones after their
-- backoff, dead-lettered ones to be written as error lines. Returns {shard record JSON, index,
-- lease_ms, created_ms} or false when the job has nothing claimable now.
-- KEYS[1] job hash   KEYS[2] job shards hash   KEYS[3] job pending zset   KEYS[4] job leased zset
-- KEYS[5] global leases zset   KEYS[6] ready zset   KEYS[7] claim sequence counter
-- ARGV[1] job_id   ARGV[2] worker_id
local state = redis.call('HGET', KEYS[1], 'state')
if (state ~= 'queued' and state ~= 'running') or redis.call('HGET', KEYS[1], 'sealed') ~= '1' then
  redis.call('ZREM', KEYS[6], ARGV[1])
  return false
end
local now = now_ms()
local first = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', int(now), 'LIMIT', 0, 1)
if #first == 0 then
  if redis.call('ZCARD', KEYS[3]) == 0 then redis.call('ZREM', KEYS[6], ARGV[1]) end
  return false
end
local idx = first[1]
local sh = get_shard(KEYS[2], idx)
if not allowed(SHARD_ALLOWED, sh.state, 'leased') then refuse('shard', sh.state, 'leased') end
if state == 'queued' then job_to(KEYS[1], state, 'running', now) end
local lease_ms = hnum(KEYS[1], 'lease_ms')
shard_to(KEYS[1], sh, 'leased')
sh.token = (sh.token or 0) + 1
sh.attempts = (sh.attempts or 0) + 1
sh.owner = ARGV[2]
sh.claimed_ms = now             -- requeue.lua: how long the shard sat untried after a storage give-back
sh.lease_isolate = sh.isolate
sh.in_flight = nil
put_shard(KEYS[2], idx, sh)
local expiry = int(now + lease_ms)
redis.call('ZREM', KEYS[3], idx)
redis.call('ZADD', KEYS[4], expiry, idx)
redis.call('ZADD', KEYS[5], expiry, ARGV[1] .. '|' .. idx)
-- to the back of its priority band: equal-priority jobs take turns
ready_add(KEYS[6], KEYS[7], KEYS[1], ARGV[1], false)
return {cjson.encode(sh), idx, int(lease_ms), redis.call('HGET', KEYS[1], 'created_ms')}
