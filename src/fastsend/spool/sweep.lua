-- ARGV: P, n. A step of the sweep that makes the index of campaigns with mail
-- due whole (lib.lua sweep_index: about n active campaigns a step, a cursor
-- all nodes share; a sweep once per SWEEP_MS) -> 0 none due, 1 a step (more
-- to come), 2 the sweep ended
return sweep_index(tonumber(ARGV[2]))
