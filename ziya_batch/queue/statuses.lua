-- Read what the statuses of many jobs need in one call (a listing, /metrics: thousands of jobs), packed as one JSON
-- string, which the client decodes at once instead of parsing tens of replies a job. Reads only.
-- KEYS[4i+1..4i+4] (i = 0, 1, ...) job hash, job progress zset, job leased zset, job dead set, of each job
-- ARGV[1] the rate window's start (ms)   ARGV[2..] the job hash's fields to read
-- Returns a JSON array, per job: [the fields' values (false where absent), progress members in the window,
-- leased shards as [index, expiry ms] pairs, dead-lettered shard count]
local fields = {}
for i = 2, #ARGV do fields[#fields + 1] = ARGV[i] end
local out = {}
for i = 0, #KEYS / 4 - 1 do
  local h = redis.call('HMGET', KEYS[4 * i + 1], unpack(fields))
  local progress, leased = {}, {}
  if h[1] then
    progress = redis.call('ZRANGEBYSCORE', KEYS[4 * i + 2], ARGV[1], '+inf')
    local flat = redis.call('ZRANGE', KEYS[4 * i + 3], 0, -1, 'WITHSCORES')
    for j = 1, #flat, 2 do leased[#leased + 1] = {flat[j], flat[j + 1]} end
  end
  out[#out + 1] = {h, progress, leased, h[1] and redis.call('SCARD', KEYS[4 * i + 4]) or 0}
end
return cjson.encode(out)
