-- ARGV: P, now, limit, node, lease_ms
-- Per message: one HMGET and one HSET; per campaign one ZREMRANGEBYRANK (the
-- claimed ids are a prefix of its due set), one SADD and the counters per batch.
local now, limit, node, lease = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local ms = clock_ms()
redis.call('ZADD', P..':nodes', ms + lease, node)
reap_dead(ms)
local act = redis.call('SMEMBERS', P..':active')
local cand = {}
for _, cid in ipairs(act) do
  local r = redis.call('ZRANGEBYSCORE', P..':due:'..cid, '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
  for i = 1, #r, 2 do cand[#cand + 1] = {tonumber(r[i + 1]), r[i], cid, i} end
end
if #act > 1 then
  -- A total order that keeps each campaign's rank order (ties included), so
  -- what is taken of each campaign is a prefix of its due set.
  table.sort(cand, function(a, b)
    if a[1] ~= b[1] then return a[1] < b[1] end
    if a[3] ~= b[3] then return a[3] < b[3] end
    return a[4] < b[4]
  end)
end
local out = {}
local ids = {}
local taken = {}
for i = 1, math.min(limit, #cand) do
  local id, cid = cand[i][2], cand[i][3]
  local k = P..':m:'..id
  local f = redis.call('HMGET', k, 'r', 'd', 'v', 's', 'a', 't')
  redis.call('HSET', k, 's', '1', 'o', node)
  ids[#ids + 1] = id
  taken[cid] = (taken[cid] or 0) + 1
  tally(cid, f[4], '1')
  out[#out + 1] = {id, cid, f[1], f[2], f[3], f[5] or '0', f[6]}
end
for cid, n in pairs(taken) do
  redis.call('ZREMRANGEBYRANK', P..':due:'..cid, 0, n - 1)
end
each_chunk('SADD', P..':fl:'..node, ids)
flush_tally()
return out
