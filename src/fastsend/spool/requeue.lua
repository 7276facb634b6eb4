-- ARGV: P, now, node, then (id, next_at)*: handed back unattempted; only messages
-- this node holds (as _RELEASE); attempts and last reply unchanged
local now, node = ARGV[2], ARGV[3]
local n = 0
for i = 4, #ARGV, 2 do
  local id, nxt = ARGV[i], ARGV[i + 1]
  local k = P..':m:'..id
  local f = redis.call('HMGET', k, 's', 'c', 'a', 'o')
  if f[1] == '1' and (not f[4] or f[4] == node) then
    local new = '0'
    if f[3] and f[3] ~= '0' then new = '2' end
    if redis.call('HGET', P..':c:'..f[2], 'status') == 'cancelled' then
      new, nxt = '7', '0'
    end
    redis.call('HSET', k, 's', new, 'n', nxt, 'u', now)
    if f[4] then
      redis.call('SREM', P..':fl:'..f[4], id)
      redis.call('HDEL', k, 'o')
    end
    if new ~= '7' then redis.call('ZADD', P..':due:'..f[2], nxt, id) end
    move(f[2], '1', new)
    n = n + 1
  end
end
return n
