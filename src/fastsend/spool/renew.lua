-- ARGV: P, node, lease_ms
local ms = clock_ms()
beat(ms, tonumber(ARGV[3]))
redis.call('ZADD', P..':nodes', ms + tonumber(ARGV[3]), ARGV[2])
return 0
