-- Give up a finalizer election without finishing the job: another caller (the workers' sweep) may be elected once
-- ARGV[2] ms have passed, at once for 0. Only the caller that holds the election gives it up. Returns 1 if it did.
-- KEYS[1] job finalizer string
-- ARGV[1] caller id   ARGV[2] ms before another caller may be elected
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  redis.call('DEL', KEYS[1])
end
return 1
