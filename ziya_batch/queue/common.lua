-- Functions prepended to every script (after the transition tables JOB_ALLOWED and SHARD_ALLOWED, which
-- states.py renders). Scripts check before they write: Redis does not roll back a script that errors.

-- Redis < 5 replicates scripts verbatim and then refuses TIME before a write; from 5 on this is a no-op
if redis.replicate_commands then redis.replicate_commands() end

local function now_ms()
  -- the Redis server's clock, so the clocks of worker hosts never decide whether a lease expired
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function int(x)
  -- exact decimal for ZADD scores and counters (tostring would print 1e+15 and drop digits)
  return string.format('%.0f', x)
end

-- at most n bytes of the UTF-8 text s, cut between characters: cut inside one, the text kept is not UTF-8, and a
-- client that decodes replies (every read of the job's errors) fails on it
local function utf8_head(s, n)
  if #s <= n then return s end
  local b = string.byte(s, n + 1)
  while n > 0 and b >= 128 and b < 192 do      -- the byte after the cut continues a character: cut before it
    n = n - 1
    b = string.byte(s, n + 1)
  end
  return string.sub(s, 1, n)
end

local function allowed(tbl, src, dst)
  return tbl[src] ~= nil and tbl[src][dst] == true
end

local function refuse(what, src, dst)
  error({err = 'TRANSITION ' .. what .. ' cannot go from ' .. tostring(src) .. ' to ' .. tostring(dst)})
end

local function job_to(job_key, src, dst, now)
  if not allowed(JOB_ALLOWED, src, dst) then refuse('job', src, dst) end
  redis.call('HSET', job_key, 'state', dst, 'updated_ms', int(now))
  -- why the last finalize try waited (end_finalize.lua) holds only while the job stays finalizing
  if src == 'finalizing' and dst ~= 'finalizing' then redis.call('HDEL', job_key, 'finalize_wait') end
end

local function get_shard(shards_key, idx)
  local raw = redis.call('HGET', shards_key, idx)
  if not raw then return nil end
  return cjson.decode(raw)
end

local function put_shard(shards_key, idx, sh)
  redis.call('HSET', shards_key, idx, cjson.encode(sh))
end

-- a shard's storage series (requeue.lua) ends: its next storage give-back starts a new one
local function end_storage_series(sh)
  sh.storage_commits = nil
  sh.storage_since = nil
  sh.storage_last = nil
end

-- moves a shard between states and keeps the job's per-state counters (n_pending, n_leased, ...) in step
local function shard_to(job_key, sh, dst)
  if not allowed(SHARD_ALLOWED, sh.state, dst) then refuse('shard', sh.state, dst) end
  redis.call('HINCRBY', job_key, 'n_' .. sh.state, -1)
  redis.call('HINCRBY', job_key, 'n_' .. dst, 1)
  sh.state = dst
end

-- a job's place among claimable jobs: higher priority first, then the one claimed from least recently
local function ready_add(ready_key, seq_key, job_key, job_id, only_new)
  local prio = tonumber(redis.call('HGET', job_key, 'priority') or '0')
  local seq = redis.call('INCR', seq_key)
  local score = int((1000 - prio) * 1e12 + seq)
  if only_new then
    redis.call('ZADD', ready_key, 'NX', score, job_id)
  else
    redis.call('ZADD', ready_key, score, job_id)
  end
end

local function hnum(key, field)
  return tonumber(redis.call('HGET', key, field) or '0') or 0
end

-- adds a committed shard's stats to the job's sums; sign -1 takes them off again (uncommit)
local function add_stats(job_key, st, sign)
  sign = sign or 1
  for _, f in ipairs({'prompts_done', 'prompts_failed', 'samples', 'output_tokens', 'prefix_cache_query_tokens',
                      'prefix_cache_hit_tokens'}) do
    local n = tonumber(st[f]) or 0
    redis.call('HINCRBY', job_key, f, int(n == 0 and 0 or sign * n))    -- -1 * 0 is -0: not an integer to Redis
  end
end

-- after a shard left `leased`: a cancelling job with no lease left is cancelled; a job whose shards are
-- all committed goes to finalizing
local function settle_job(job_key, ready_key, job_id, now)
  local state = redis.call('HGET', job_key, 'state')
  if state == 'cancelling' and hnum(job_key, 'n_leased') == 0 then
    job_to(job_key, state, 'cancelled', now)
    redis.call('HSET', job_key, 'finished_ms', int(now))
  elseif (state == 'queued' or state == 'running') and redis.call('HGET', job_key, 'sealed') == '1'
      and hnum(job_key, 'n_committed') == hnum(job_key, 'total_shards') then
    job_to(job_key, state, 'finalizing', now)
    redis.call('ZREM', ready_key, job_id)
  end
  return redis.call('HGET', job_key, 'state')
end
