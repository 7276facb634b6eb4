-- ARGV: P, now, limit, node, lease_ms, then tenant, weight, ... (the operator's
-- tenant weights other than 1) -> flat {id, state, data, ...} (state as
-- stored after the claim: "1|node|campaign|attempts|...")
-- Per bucket of ids (lib.lua) one HMGET and one HSET; per active campaign one
-- ZCOUNT, per campaign claimed from one ZRANGEBYSCORE and one ZREMRANGEBYRANK
-- (the claimed ids are a prefix of its due set); one SADD per 1000 and the
-- counters per batch.
local now, limit, node, lease = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local ms = clock_ms()
beat(ms, lease)
redis.call('ZADD', P..':nodes', ms + lease, node)
reap_dead(ms)
-- The room shared between the active campaigns with mail due (lib.lua
-- fair_shares: as spool/fair.py); what is taken of each is a prefix of its due
-- set (its oldest due first).
local cands, name = {}, {}
for _, cid in ipairs(redis.call('SMEMBERS', P..':active')) do
  local n = redis.call('ZCOUNT', P..':due:'..cid, '-inf', now)
  if n > 0 then
    local c = tonumber(cid)
    name[c] = cid
    cands[#cands + 1] = {c, '', 0, 1, math.min(n, limit)}
  end
end
local shares = {}
if #cands == 1 then  -- one campaign (the common case): nothing to share
  shares[1] = {cands[1][1], limit}
elseif #cands > 1 then
  local fs, ranks = {}, {}
  for i, c in ipairs(cands) do fs[i] = name[c[1]] end
  for j = 1, #fs, 1000 do  -- (unpack takes a few thousand at most)
    local r = redis.call('HMGET', P..':fair', unpack(fs, j, math.min(j + 999, #fs)))
    for i = 1, #r do ranks[j + i - 1] = r[i] end
  end
  for i, c in ipairs(cands) do
    -- "priority|weight|tenant" (RedisSpool.create_campaign); none: a tenant of its own
    local p, w, t = string.match(ranks[i] or '', '^(%-?%d+)|(%d+)|(.*)$')
    c[2] = t or ('#'..fs[i])
    c[3] = tonumber(p) or 0
    c[4] = math.max(tonumber(w) or 1, 1)
  end
  local tw = nil
  for j = 6, #ARGV - 1, 2 do
    tw = tw or {}
    tw[ARGV[j]] = math.max(tonumber(ARGV[j + 1]) or 1, 1)
  end
  shares = fair_shares(cands, limit, redis.call('INCR', P..':fair:turn') - 1, tw)
end
local ids, taken, cidof = {}, {}, {}
for _, s in ipairs(shares) do
  local cid = name[s[1]]
  local r = redis.call('ZRANGEBYSCORE', P..':due:'..cid, '-inf', now, 'LIMIT', 0, s[2])
  for i = 1, #r do
    ids[#ids + 1] = r[i]
    cidof[r[i]] = cid
  end
  if #r > 0 then taken[cid] = #r end
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
