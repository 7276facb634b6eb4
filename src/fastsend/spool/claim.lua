-- ARGV: P, now, limit, node, lease_ms -> flat {id, state, data, ...} (state as
-- stored after the claim: "1|node|campaign|attempts|...")
-- Per bucket of ids (lib.lua) one HMGET and one HSET; per campaign one
-- ZRANGEBYSCORE and one ZREMRANGEBYRANK (the claimed ids are a prefix of its
-- due set); one SADD per 1000 and the counters per batch.
local now, limit, node, lease = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local ms = clock_ms()
beat(ms, lease)
redis.call('ZADD', P..':nodes', ms + lease, node)
reap_dead(ms)
local act = redis.call('SMEMBERS', P..':active')
local ids, taken, cidof = {}, {}, {}
if #act == 1 then  -- one campaign (the common case): its due set's prefix as it is
  local cid = act[1]
  local r = redis.call('ZRANGEBYSCORE', P..':due:'..cid, '-inf', now, 'LIMIT', 0, limit)
  for i = 1, #r do
    ids[i] = r[i]
    cidof[r[i]] = cid
  end
  if #r > 0 then taken[cid] = #r end
  act = {}
end
local cand = {}
for _, cid in ipairs(act) do
  local r = redis.call('ZRANGEBYSCORE', P..':due:'..cid, '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
  for i = 1, #r, 2 do cand[#cand + 1] = {tonumber(r[i + 1]), r[i], cid, i} end
end
if #act > 1 then
  -- Several campaigns: a total order that keeps each campaign's rank order (ties included), so
  -- what is taken of each campaign is a prefix of its due set.
  table.sort(cand, function(a, b)
    if a[1] ~= b[1] then return a[1] < b[1] end
    if a[3] ~= b[3] then return a[3] < b[3] end
    return a[4] < b[4]
  end)
end
for i = 1, math.min(limit, #cand) do
  local id, cid = cand[i][2], cand[i][3]
  ids[#ids + 1] = id
  cidof[id] = cid
  taken[cid] = (taken[cid] or 0) + 1
end
for cid, n in pairs(taken) do
  redis.call('ZREMRANGEBYRANK', P..':due:'..cid, 0, n - 1)
end
local out, held = {}, {}
local sub, find = string.sub, string.find
local head = '1|'..node
for _, g in ipairs(group(ids)) do
  local fs = {}
  for _, id in ipairs(g[2]) do
    fs[#fs + 1] = id
    fs[#fs + 1] = id..'s'
  end
  local v = redis.call('HMGET', g[1], unpack(fs))
  local hs = {}
  for i, id in ipairs(g[2]) do
    local st = v[2 * i]
    local s = st and sub(st, 1, 1)
    -- only pending messages (a due entry of anything else is stale: dropped)
    if s == '0' or s == '2' then
      tally(cidof[id], s, '1')
      st = head..sub(st, (find(st, '|', 3, true)))  -- state and owner replaced
      hs[#hs + 1] = id..'s'
      hs[#hs + 1] = st
      held[#held + 1] = id
      out[#out + 1] = id
      out[#out + 1] = st
      out[#out + 1] = v[2 * i - 1]
    end
  end
  if #hs > 0 then redis.call('HSET', g[1], unpack(hs)) end
end
each_chunk('SADD', P..':fl:'..node, held)
flush_tally()
return out
