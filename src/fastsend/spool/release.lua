-- ARGV: P, node, ids...: only messages this node holds (after its lease expired
-- another node may hold them now: releasing those would send them twice)
local n = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  local k = P..':m:'..id
  local f = redis.call('HMGET', k, 's', 'c', 'n', 'o')
  if f[1] == '1' and (not f[4] or f[4] == ARGV[2]) then
    redis.call('HSET', k, 's', '0')
    if f[4] then
      redis.call('SREM', P..':fl:'..f[4], id)
      redis.call('HDEL', k, 'o')
    end
    redis.call('ZADD', P..':due:'..f[2], f[3], id)
    move(f[2], '1', '0')
    n = n + 1
  end
end
return n
