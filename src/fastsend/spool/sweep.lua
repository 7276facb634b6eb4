-- ARGV: P. The index of campaigns with mail due made whole (lib.lua sweep_index),
-- once per SWEEP_MS of all nodes' calls -> 1 swept, 0 not yet
return sweep_index()
