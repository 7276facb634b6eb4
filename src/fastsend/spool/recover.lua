-- ARGV: P, node, lease_ms, then (node, holder tag) of nodes known dead (their
-- process gone on this host: RedisSpool._dead_here), taken back whatever their
-- lease while that dead process is still their last holder
local ms = clock_ms()
local n = requeue_node(ARGV[2], true)
for i = 4, #ARGV, 2 do
  local d = ARGV[i]
  if redis.call('HGET', P..':holders', d) == ARGV[i + 1] then
    n = n + requeue_node(d)
    redis.call('ZREM', P..':nodes', d)
    redis.call('HDEL', P..':graced', d)
    redis.call('HDEL', P..':holders', d)
  end
end
beat(ms, tonumber(ARGV[3]))
return n + reap_dead(ms)
