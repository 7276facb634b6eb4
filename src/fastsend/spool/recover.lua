-- ARGV: P, node
local n = requeue_node(ARGV[2])
return n + reap_dead(clock_ms())
