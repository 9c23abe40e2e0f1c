-- Forget a finished job: every key of it and its entries in the indexes go, in this one step; its output in storage
-- is not touched. Refused while the job is not finished (states.py's finished states, ARGV[6..]), while a lease on one
-- of its shards has not expired (a worker may still be at work on it: its commit would be refused), and where it
-- finished after ARGV[3]. Expired leases (their workers gone) are dropped with it. With ARGV[4] = '1' it only says
-- what it would do (--dry-run). After it, a worker that still held an expired lease finds its heartbeat, progress
-- and commit refused (no shard, no job), and writes nothing back.
-- KEYS[1] zset of all jobs   KEYS[2] ready jobs zset   KEYS[3] global leases zset   KEYS[4] job hash
-- KEYS[5] job leased zset   KEYS[6 .. 5 + ARGV[5]] every key of the job (keys.job_keys: the two above among them)
-- KEYS[6 + ARGV[5] ..] every registered worker's hash: its cannot_load notes (JSON, job id -> why) may name the job
-- ARGV[1] job_id   ARGV[2] the leases zset's member prefix of the job ("<job>|")
-- ARGV[3] forget only a job that finished before this (Redis ms; '' = whenever)   ARGV[4] '1': dry run
-- ARGV[5] how many keys of the job follow KEYS[5]   ARGV[6..] the finished job states
-- Returns {'forgotten' | 'would forget', state, total shards, job keys deleted (0 on a dry run), notes removed}
--   | {'unknown'} | {'not finished', state} | {'leased', state, live leases, ms until the last expires}
--   | {'too recent', state, finished_ms}
-- the jobs index first: an id that names one of a job's other keys (`<id>:spec`) is no job, and is never read as one
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {'unknown'} end
local state = redis.call('HGET', KEYS[4], 'state')
if not state then return {'unknown'} end
local finished = false
for i = 6, #ARGV do
  if ARGV[i] == state then finished = true end
end
if not finished then return {'not finished', state} end
if ARGV[3] ~= '' then
  -- a job finished before finished_ms was recorded has its last change instead
  local at = tonumber(redis.call('HGET', KEYS[4], 'finished_ms') or '') or hnum(KEYS[4], 'updated_ms')
  if at >= tonumber(ARGV[3]) then return {'too recent', state, int(at)} end
end
local now = now_ms()
local leased = redis.call('ZRANGE', KEYS[5], 0, -1, 'WITHSCORES')
local live, last = 0, now
for j = 1, #leased, 2 do
  local expiry = tonumber(leased[j + 1])
  if expiry > now then
    live = live + 1
    if expiry > last then last = expiry end
  end
end
if live > 0 then return {'leased', state, live, int(last - now)} end
local shards = int(hnum(KEYS[4], 'total_shards'))
local last_key = 5 + tonumber(ARGV[5])
if ARGV[4] == '1' then return {'would forget', state, shards, 0, 0} end
for j = 1, #leased, 2 do
  redis.call('ZREM', KEYS[3], ARGV[2] .. leased[j])
end
local notes = 0
for i = last_key + 1, #KEYS do
  local raw = redis.call('HGET', KEYS[i], 'cannot_load')
  if raw and string.find(raw, '"' .. ARGV[1] .. '"', 1, true) then
    local ok, map = pcall(cjson.decode, raw)
    if ok and type(map) == 'table' and map[ARGV[1]] ~= nil then
      map[ARGV[1]] = nil
      notes = notes + 1
      if next(map) == nil then
        redis.call('HDEL', KEYS[i], 'cannot_load')
      else
        redis.call('HSET', KEYS[i], 'cannot_load', cjson.encode(map))
      end
    end
  end
end
-- UNLINK: the keys are gone at once, their memory is freed off Redis's main thread (a completed 10-million-line job,
-- 16 MB, held every client for 3.5 ms with DEL, 0.07 ms so: docs/BENCHMARKS.md)
local deleted = 0
for i = 6, last_key do
  deleted = deleted + redis.call('UNLINK', KEYS[i])
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return {'forgotten', state, shards, deleted, notes}
