-- ARGV: P, now, limit, node, lease_ms -> flat {id, cid, attempts, data, ...}
-- Per bucket of ids (lib.lua) one HMGET and one HSET; per campaign one
-- ZRANGEBYSCORE and one ZREMRANGEBYRANK (the claimed ids are a prefix of its
-- due set); one SADD per 1000 and the counters per batch.
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
local ids, taken = {}, {}
for i = 1, math.min(limit, #cand) do
  local id, cid = cand[i][2], cand[i][3]
  ids[#ids + 1] = id
  taken[cid] = (taken[cid] or 0) + 1
end
for cid, n in pairs(taken) do
  redis.call('ZREMRANGEBYRANK', P..':due:'..cid, 0, n - 1)
end
local out, held, rows = {}, {}, {}
for _, g in ipairs(group(ids)) do
  local fs = {}
  for _, id in ipairs(g[2]) do
    fs[#fs + 1] = id
    fs[#fs + 1] = id..'s'
  end
  local v = redis.call('HMGET', g[1], unpack(fs))
  for i, id in ipairs(g[2]) do
    local data, st = v[2 * i - 1], v[2 * i]
    if st then
      local f = parse(st)
      -- only pending messages (a due entry of anything else is stale: dropped)
      if f[1] == '0' or f[1] == '2' then
        tally(f[5], f[1], '1')
        f[1], f[6] = '1', node
        rows[#rows + 1] = {id, f}
        held[#held + 1] = id
        out[#out + 1] = id
        out[#out + 1] = f[5]
        out[#out + 1] = f[2]
        out[#out + 1] = data
      end
    end
  end
end
put_states(rows)
each_chunk('SADD', P..':fl:'..node, held)
flush_tally()
return out
