-- ARGV: P, now, limit, node, lease_ms, then tenant, weight, ... (the operator's
-- tenant weights other than 1) -> flat {id, state, data, ...} (state as
-- stored after the claim: "1|node|campaign|attempts|...")
-- The campaigns with mail due come from the index P:dueidx (lib.lua), not from
-- every active campaign's due set (2,000 active campaigns cost a ZCOUNT each,
-- every claim, due or not). Per bucket of ids (lib.lua) one HMGET and one
-- HSET; per campaign given a share one ZRANGEBYSCORE (its head past its due
-- mail with it) and one ZREMRANGEBYRANK (the claimed ids are a prefix of its
-- due set); the index's new scores in one ZADD and one ZREM, one SADD per
-- 1000 and the counters per batch (was ~4 calls per campaign given mail).
local now, limit, node, lease = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local ms = clock_ms()
beat(ms, lease)
redis.call('ZADD', P..':nodes', ms + lease, node)
reap_dead(ms)
-- The room shared between the active campaigns with mail due (lib.lua
-- fair_shares: as spool/fair.py); what is taken of each is a prefix of its due
-- set (its oldest due first). A campaign's due mail is not counted ahead: each
-- takes part as having `limit` until read; its share is read with one more
-- (LIMIT share + 1): more than its share, it has at least that much and no
-- step of the water-filling met its count, so the shares are those of the true
-- counts; else what it has is its count and the shares are made again with it
-- (as SQLite's _shares).
-- A `fastsend send`'s campaign (P:own: campaign -> the node name of the process
-- running it) is that node's alone: another node leaves it in the index, due
-- (its routes and IPs are not the send's; `resume` adopts it once that process
-- is dead: RedisSpool.adopt_sends).
local cands, name, off = {}, {}, {}
local idx = redis.call('ZRANGEBYSCORE', P..':dueidx', '-inf', now)
local owned = redis.call('HLEN', P..':own') > 0
for j = 1, #idx, 1000 do  -- (only active campaigns: the others leave the index)
  local part = {unpack(idx, j, math.min(j + 999, #idx))}
  local on = redis.call('SMISMEMBER', P..':active', unpack(part))
  local own = owned and redis.call('HMGET', P..':own', unpack(part)) or {}
  for i = 1, #part do
    if own[i] and own[i] ~= node then
      -- (another node's send: not a candidate, and stays indexed)
    elseif on[i] == 1 then
      local c = tonumber(part[i])
      name[c] = part[i]
      cands[#cands + 1] = {c, '', 0, 1, limit}
    else
      off[#off + 1] = part[i]
    end
  end
end
if #off > 0 then each_chunk('ZREM', P..':dueidx', off) end
local turn, tw = 0, nil
if #cands > 1 then
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
  for j = 6, #ARGV - 1, 2 do
    tw = tw or {}
    tw[ARGV[j]] = math.max(tonumber(ARGV[j + 1]) or 1, 1)
  end
  turn = redis.call('INCR', P..':fair:turn') - 1
end
-- A campaign's due set read from its head, due or not (m entries): its due ids,
-- and the score after them: the set's head once they are taken (false: none
-- after them; nil: all m due, what follows unknown). The index's new score
-- comes with the read (was a ZRANGE of the head per campaign taken from).
local nowf = tonumber(now)
local function read_due(cid, m)
  local got = redis.call('ZRANGEBYSCORE', P..':due:'..cid, '-inf', '+inf', 'WITHSCORES',
    'LIMIT', 0, m)
  local r = {}
  for i = 1, #got, 2 do
    if tonumber(got[i + 1]) > nowf then return r, got[i + 1] end
    r[#r + 1] = got[i]
  end
  if #got < 2 * m then return r, false end
  return r, nil
end
local read, known, after = {}, {}, {}  -- campaign -> its due ids read; its count; read_due's after
local shares
while true do
  local live = {}
  for _, c in ipairs(cands) do
    c[5] = known[c[1]] or limit
    if c[5] > 0 then live[#live + 1] = c end
  end
  if #live == 1 then  -- one campaign (the common case): nothing to share
    shares = {{live[1][1], live[1][5]}}
  elseif #live > 1 then
    shares = fair_shares(live, limit, turn, tw)
  else
    shares = {}
  end
  local again = false
  for _, s in ipairs(shares) do
    local c, n = s[1], s[2]
    if known[c] == nil then
      local r = read[c]
      if r == nil or #r <= n then
        r, after[c] = read_due(name[c], math.min(n + 1, limit))
        read[c] = r
      end
      if #r <= n and #r < limit then  -- all it has: counted, shares again
        known[c] = #r
        again = true
      end
    end
  end
  if not again then break end
end
-- Its index score stays while it has mail due (below its new head: as the
-- index needs); all its due mail taken, it goes to its later head, or out
-- (one ZADD and one ZREM for all: the heads came with the reads).
local ids, cidof, took = {}, {}, {}
local rescore, gone = {}, {}
local function to_head(c)
  local h = after[c]
  if h then
    rescore[#rescore + 1] = h
    rescore[#rescore + 1] = name[c]
  elseif h == false then
    gone[#gone + 1] = name[c]
  else
    index_head(name[c])  -- (all it read was due: its head past them unknown)
  end
end
for _, s in ipairs(shares) do  -- (in the shares' order, each campaign's oldest due first)
  local c = s[1]
  local r, cid = read[c], name[c]
  local n = math.min(s[2], #r)
  took[c] = true
  for i = 1, n do
    ids[#ids + 1] = r[i]
    cidof[r[i]] = cid
  end
  if n > 0 then redis.call('ZREMRANGEBYRANK', P..':due:'..cid, 0, n - 1) end
  if #r <= n then to_head(c) end
end
for c, r in pairs(read) do
  if #r == 0 and not took[c] then to_head(c) end  -- (a score below its head)
end
for i = 1, #rescore, 1000 do
  redis.call('ZADD', P..':dueidx', unpack(rescore, i, math.min(i + 999, #rescore)))
end
if #gone > 0 then each_chunk('ZREM', P..':dueidx', gone) end
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
