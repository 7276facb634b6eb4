-- ARGV: P, node, lease_ms
redis.call('ZADD', P..':nodes', clock_ms() + tonumber(ARGV[3]), ARGV[2])
return 0
