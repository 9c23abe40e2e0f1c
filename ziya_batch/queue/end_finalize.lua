-- Give up a finalizer election without finishing the job: another caller (the workers' sweep) may be elected once
-- ARGV[2] ms have passed, at once for 0. Only the caller that holds the election gives it up. Returns 1 if it did.
-- With a reason (ARGV[3]: the try could not finish because storage did not answer), the job hash's finalize_wait
-- records it for status, as JSON: reason, at_ms (this try), since_ms (the first try of the run of such tries),
-- tries (in that run), next_ms (when another caller may be elected); without one (the try got past storage) it is
-- removed. A job that leaves finalizing loses it too (common.lua job_to).
-- KEYS[1] job finalizer string   KEYS[2] job hash
-- ARGV[1] caller id   ARGV[2] ms before another caller may be elected   ARGV[3] reason or ''
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local wait_ms = tonumber(ARGV[2])
if wait_ms > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  redis.call('DEL', KEYS[1])
end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[2], 'finalize_wait')
elseif redis.call('HGET', KEYS[2], 'state') == 'finalizing' then
  local now = now_ms()
  local since, tries = now, 0
  local last = redis.call('HGET', KEYS[2], 'finalize_wait')
  if last then
    local ok, w = pcall(cjson.decode, last)
    if ok and type(w) == 'table' then
      since = tonumber(w.since_ms) or now
      tries = tonumber(w.tries) or 0
    end
  end
  -- times as exact decimal strings (cjson would print 1.7651234567890e+12)
  redis.call('HSET', KEYS[2], 'finalize_wait', cjson.encode({reason = ARGV[3], at_ms = int(now),
    since_ms = int(since), tries = tries + 1, next_ms = int(now + wait_ms)}))
end
return 1
