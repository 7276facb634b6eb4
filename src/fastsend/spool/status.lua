-- ARGV: P, cid, status
local k = P..':c:'..ARGV[2]
if redis.call('EXISTS', k) == 0 then return 0 end
redis.call('HSET', k, 'status', ARGV[3])
if ARGV[3] == 'active' then
  redis.call('SADD', P..':active', ARGV[2])
else
  redis.call('SREM', P..':active', ARGV[2])
end
return 1
