-- ARGV: P, node, lease_ms
local ms = clock_ms()
beat(ms, tonumber(ARGV[3]))
local n = requeue_node(ARGV[2])
return n + reap_dead(ms)
