-- Register a worker (ARGV[2] host and ARGV[3] info given) or record that it is alive. Returns now_ms.
-- KEYS[1] workers zset   KEYS[2] worker hash
-- ARGV[1] worker_id   ARGV[2] host or ''   ARGV[3] info JSON or ''
local now = now_ms()
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[2], 'host', ARGV[2], 'info', ARGV[3], 'started_ms', int(now))
end
redis.call('ZADD', KEYS[1], int(now), ARGV[1])
return int(now)
