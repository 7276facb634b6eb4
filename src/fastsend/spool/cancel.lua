-- ARGV: P, cid, n: cancel up to n pending messages of a (non-active) campaign
local cid, due = ARGV[2], P..':due:'..ARGV[2]
local ids = redis.call('ZRANGE', due, 0, tonumber(ARGV[3]) - 1)
for _, id in ipairs(ids) do
  local k = P..':m:'..id
  local s = redis.call('HGET', k, 's')
  if s == '0' or s == '2' then
    redis.call('HSET', k, 's', '7', 'n', '0')
    move(cid, s, '7')
  end
end
if #ids > 0 then redis.call('ZREMRANGEBYRANK', due, 0, #ids - 1) end
return #ids
