-- ARGV: P, cid, status, reason (the status and why, together)
local k = P..':c:'..ARGV[2]
if redis.call('EXISTS', k) == 0 then return 0 end
redis.call('HSET', k, 'status', ARGV[3], 'reason', ARGV[4] or '')
if ARGV[3] == 'active' then
  redis.call('SADD', P..':active', ARGV[2])
  index_head(ARGV[2])  -- (its mail due: claimed again)
else
  redis.call('SREM', P..':active', ARGV[2])
  redis.call('ZREM', P..':dueidx', ARGV[2])
end
return 1
