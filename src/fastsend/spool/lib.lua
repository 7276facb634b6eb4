-- Prepended to every spool script at load: P is the key prefix (ARGV[1]).
-- Messages live in buckets of B consecutive ids: P:m:(id // B) is a hash with
-- two fields per message, ID = "rcpt\0domain\0created\0vars" (written once)
-- and ID.."s" = "s|o|c|a|n|u|lc|le|lt" (state: one digit, owner node, campaign,
-- attempts, next attempt, updated, last code / enhanced / text: the text last, it
-- may hold '|'; a node name holds none). claim.lua and record.lua edit it in place
-- (its head changes, the rest is copied); the rest reads it with parse(). A batch of consecutive ids is one HMGET and one HSET per bucket, not
-- per message: that is what keeps Redis at well under one command a message.
-- tally() keeps the per-state counters; requeue_node()/reap_dead() take
-- back the in-flight window of a node (whose lease expired).
local P = ARGV[1]
local B = 128
local function bucket(id) return P..':m:'..math.floor(tonumber(id) / B) end
-- parse() gives {s, a, n, u, c, o, tail}; pack() stores it back
local function parse(v)
  local s, o, c, a, n, u, t = string.match(v, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
  return {s, a, n, u, c, o, t}
end
local function pack(f)
  return f[1]..'|'..f[6]..'|'..f[5]..'|'..f[2]..'|'..f[3]..'|'..f[4]..'|'..f[7]
end
-- ids grouped by bucket, in order: {{key, {id, ...}}, ...}
local function group(ids)
  local out, at = {}, {}
  for _, id in ipairs(ids) do
    local k = bucket(id)
    local g = at[k]
    if g == nil then g = {k, {}}; at[k] = g; out[#out + 1] = g end
    g[2][#g[2] + 1] = id
  end
  return out
end
-- id -> parsed state of those that exist; one HMGET per bucket
local function states(ids)
  local out = {}
  for _, g in ipairs(group(ids)) do
    local fs = {}
    for i, id in ipairs(g[2]) do fs[i] = id..'s' end
    local v = redis.call('HMGET', g[1], unpack(fs))
    for i, id in ipairs(g[2]) do
      if v[i] then out[id] = parse(v[i]) end
    end
  end
  return out
end
-- write {id, parsed state} rows back: one HSET per bucket
local function put_states(rows)
  local by, order = {}, {}
  for _, r in ipairs(rows) do
    local k = bucket(r[1])
    local t = by[k]
    if t == nil then t = {}; by[k] = t; order[#order + 1] = k end
    t[#t + 1] = r[1]..'s'
    t[#t + 1] = pack(r[2])
  end
  for _, k in ipairs(order) do redis.call('HSET', k, unpack(by[k])) end
end
local function clock_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Counter moves of a batch, summed: tally(cid, old, new) per message, then
-- flush_tally() writes them to P:nd (fields "CID|state": one HMGET and one
-- HSET per 500, not one HINCRBY per campaign and state: a claim over 2,000
-- campaigns touched 1,000) and the totals to P:n. A campaign's counts are
-- its P:n:CID (what was spooled, add_messages) plus its P:nd moves, which sum
-- to 0 (RedisSpool.counts).
local tally_t = {}
local function tally(cid, old, new)
  if old == new then return end
  local t = tally_t[cid]
  if t == nil then t = {}; tally_t[cid] = t end
  if old then t[old] = (t[old] or 0) - 1 end
  t[new] = (t[new] or 0) + 1
end
local function flush_tally()
  local all, fs, ds = {}, {}, {}
  for cid, t in pairs(tally_t) do
    for st, d in pairs(t) do
      if d ~= 0 then
        fs[#fs + 1] = cid..'|'..st
        ds[#ds + 1] = d
        all[st] = (all[st] or 0) + d
      end
    end
  end
  for i = 1, #fs, 500 do
    local j = math.min(i + 499, #fs)
    local cur = redis.call('HMGET', P..':nd', unpack(fs, i, j))
    local hs = {}
    for k = i, j do
      hs[#hs + 1] = fs[k]
      hs[#hs + 1] = string.format('%d', (tonumber(cur[k - i + 1]) or 0) + ds[k])
    end
    redis.call('HSET', P..':nd', unpack(hs))
  end
  for st, d in pairs(all) do
    if d ~= 0 then redis.call('HINCRBY', P..':n', st, d) end
  end
  tally_t = {}
end
-- A variadic command over a long list, 1000 arguments a call (Lua's stack).
local function each_chunk(cmd, key, list)
  for i = 1, #list, 1000 do
    redis.call(cmd, key, unpack(list, i, math.min(i + 999, #list)))
  end
end
-- Sorted-set adds collected per key, then one ZADD per key and 500 members.
local zadd_t = {}
-- A due set's score of id, due at `at`: less 10 us per digit it has fewer than
-- 20, so ids due at one time come out by number, not as strings ("10" before
-- "9"; redis.py due_score).
local function due_score(at, id)
  return string.format('%.17g', tonumber(at) - (20 - #id) * 1e-5)
end
-- (every caller adds to a due set)
local function zadd_later(key, at, id)
  local t = zadd_t[key]
  if t == nil then t = {}; zadd_t[key] = t end
  t[#t + 1] = due_score(at, id)
  t[#t + 1] = id
end
-- P:dueidx: the active campaigns with mail in their due set, each scored at
-- most its due set's head (the claim reads only those due now, not every
-- active campaign's set: claim.lua). Whatever adds to a due set lowers its
-- campaign's score (ZADD LT); the claim sets it to the new head, or removes it,
-- for the campaigns it takes from, and removes campaigns not active; a
-- campaign set active is added at its head (status.lua). A score lower than the
-- head only costs a look; a missing one would hold mail, so sweep_index()
-- adds every active campaign's head every SWEEP_MS, in steps (sweep.lua: at the open of a
-- spool made before the index, then from each node's renew(); mail a node of
-- an older fastsend spools meanwhile waits at most that long).
local function flush_zadd()
  local heads = {}
  for key, t in pairs(zadd_t) do
    each_chunk('ZADD', key, t)
    local low = tonumber(t[1])
    for i = 3, #t, 2 do
      local v = tonumber(t[i])
      if v < low then low = v end
    end
    heads[#heads + 1] = string.format('%.17g', low)
    heads[#heads + 1] = string.sub(key, #P + 6)  -- (P..':due:'..cid)
  end
  if #heads > 0 then
    for i = 1, #heads, 1000 do
      redis.call('ZADD', P..':dueidx', 'LT', unpack(heads, i, math.min(i + 999, #heads)))
    end
  end
  zadd_t = {}
end
-- the campaign's index entry at its due set's head (none: out of the index)
local function index_head(cid)
  local h = redis.call('ZRANGE', P..':due:'..cid, 0, 0, 'WITHSCORES')
  if h[2] then
    redis.call('ZADD', P..':dueidx', h[2], cid)
  else
    redis.call('ZREM', P..':dueidx', cid)
  end
end
local SWEEP_MS = 30000
-- One step of the sweep: about n active campaigns (SSCAN COUNT n from the
-- cursor P:dueidx:cursor, which every node's step moves on: a sweep started by
-- one node is ended by any), so 100,000 active campaigns are 100 short scripts,
-- not one that held Redis ~1 s. A new sweep starts once per SWEEP_MS after
-- the last one ended. -> 0 none due, 1 a step made (more to come), 2 swept.
local function sweep_index(n)
  local cursor = redis.call('GET', P..':dueidx:cursor')
  if not cursor then
    if not redis.call('SET', P..':dueidx:swept', '1', 'NX', 'PX', SWEEP_MS) then return 0 end
    cursor = '0'
  end
  local got = redis.call('SSCAN', P..':active', cursor, 'COUNT', n)
  local heads = {}
  for _, cid in ipairs(got[2]) do
    local h = redis.call('ZRANGE', P..':due:'..cid, 0, 0, 'WITHSCORES')
    if h[2] then
      heads[#heads + 1] = h[2]
      heads[#heads + 1] = cid
    end
  end
  for i = 1, #heads, 1000 do
    redis.call('ZADD', P..':dueidx', 'LT', unpack(heads, i, math.min(i + 999, #heads)))
  end
  if got[1] ~= '0' then
    redis.call('SET', P..':dueidx:cursor', got[1])
    return 1
  end
  redis.call('DEL', P..':dueidx:cursor')
  redis.call('SET', P..':dueidx:swept', '1', 'PX', SWEEP_MS)
  return 2
end
-- Pending messages handed back from a node: back to queued (or deferred, when
-- attempted before), due at their next attempt time; a cancelled campaign's
-- become final. ids: those the node held; only those it still holds move.
local cancelled_t = {}
local function is_cancelled(cid)
  local c = cancelled_t[cid]
  if c == nil then
    c = redis.call('HGET', P..':c:'..cid, 'status') == 'cancelled'
    cancelled_t[cid] = c
  end
  return c
end
-- In-flight messages of `node` among ids (and unowned ones when `loose`) back
-- to pending, due at their next attempt time. Returns how many moved.
local function put_back(ids, node, loose)
  local rows = {}
  for id, f in pairs(states(ids)) do
    if f[1] == '1' and (f[6] == node or (loose and f[6] == '')) then
      f[1], f[6] = '0', ''
      rows[#rows + 1] = {id, f}
      zadd_later(P..':due:'..f[5], f[3], id)
      tally(f[5], '1', '0')
    end
  end
  put_states(rows)
  flush_zadd()
  flush_tally()
  return #rows
end
-- The window of a node that died holding it (its lease lapsed, or it restarted
-- under its name): each message may have been sent, and is sent again (the
-- duplicates bounded by the window). One attempt of unknown outcome each, as
-- for a killed worker's window: deferred, due again at once, the
-- reply saying so; a cancelled campaign's final. Each is listed in P:unk
-- ("id|campaign|attempts|at|node") for a node to tell as a deferred event
-- (RedisSpool.taken_back).
-- Seconds a message taken back with a provider's evidence (P:taken:ID) waits
-- for the taker to settle it (settle_taken, at its next flush) before it is due.
local TAKEN_GRACE = 60
local function take_back(ids, node)
  local at = string.format('%.3f', clock_ms() / 1000)
  local tail = '451|4.3.0|local error: node '..node..' stopped with this message in flight:'
    ..' outcome unknown, sent again'
  local rows, told = {}, {}
  for id, f in pairs(states(ids)) do
    if f[1] == '1' and f[6] == node then
      local cid = f[5]
      f[2] = tostring((tonumber(f[2]) or 0) + 1)
      f[4], f[6], f[7] = at, '', tail
      if is_cancelled(cid) then
        f[1], f[3] = '7', '0'
      else
        f[1] = '2'  -- its due time (passed when it was claimed) kept: due at once
        if redis.call('EXISTS', P..':taken:'..id) == 1 then
          -- A provider's event already showed it has the message (settle.lua kept
          -- it): the taker settles it (RedisSpool.settle_taken, at its next
          -- flush); due only later, if it does not. Due at once, another node's
          -- claim took it first and sent it again, the evidence then dropped.
          f[3] = string.format('%.3f', clock_ms() / 1000 + TAKEN_GRACE)
        end
        zadd_later(P..':due:'..cid, f[3], id)
        told[#told + 1] = id..'|'..cid..'|'..f[2]..'|'..f[3]..'|'..node
      end
      rows[#rows + 1] = {id, f}
      tally(cid, '1', f[1])
    end
  end
  put_states(rows)
  flush_zadd()
  flush_tally()
  if #told > 0 then
    each_chunk('RPUSH', P..':unk', told)
    redis.call('LTRIM', P..':unk', -1000000, -1)  -- told by no node for long: the oldest go
  end
  return #rows
end
-- The outcomes a node recorded and had not told yet (P:untold:NODE, record.lua)
-- go to P:untold, for any node to tell (RedisSpool.untold_of_dead).
local function orphan_untold(node)
  local u = P..':untold:'..node
  local v = redis.call('LRANGE', u, 0, -1)
  if #v > 0 then each_chunk('RPUSH', P..':untold', v) end
  redis.call('DEL', u)
end
-- (own: a start taking its own node name's window back; its untold list stays
-- its own, for RedisSpool.untold)
local function requeue_node(node, own)
  local fl = P..':fl:'..node
  local n = take_back(redis.call('SMEMBERS', fl), node)
  redis.call('DEL', fl)
  if not own then orphan_untold(node) end
  if n > 0 then redis.call('HINCRBY', P..':stats', 'taken_over', n) end
  return n
end
-- A sign of life (a claim, a renewal, a start) at Redis time now_ms, from a
-- node of lease lease_ms. P:beat is about the last one of any node (written
-- when older than lease/8: one GET most times). When none came for half a
-- lease or more, Redis was out of reach or refused writes (a restart, a
-- failover, the network, a full disk) or every node was silent: the leases
-- that lapsed meanwhile lapsed alike for the nodes that are alive, which could
-- not renew them, so each gets one lease from now to renew it in before its
-- window is taken back as a dead node's (which would send every live node's
-- window twice). P:graced keeps the deadline it was given: one still at that
-- deadline (it never renewed) is not graced again. A node that died in such
-- a silence costs one lease more.
local function beat(now_ms, lease_ms)
  local last = tonumber(redis.call('GET', P..':beat') or '') or 0
  if now_ms - last < lease_ms / 8 then return end
  redis.call('SET', P..':beat', string.format('%.0f', now_ms))
  if now_ms - last < lease_ms / 2 then return end
  local lapsed = redis.call('ZRANGEBYSCORE', P..':nodes', '('..string.format('%.0f', last), now_ms,
    'WITHSCORES')
  for i = 1, #lapsed, 2 do
    local d, dl = lapsed[i], tonumber(lapsed[i + 1])
    if tonumber(redis.call('HGET', P..':graced', d) or '') ~= dl then
      local til = string.format('%.0f', now_ms + lease_ms)
      redis.call('ZADD', P..':nodes', til, d)
      redis.call('HSET', P..':graced', d, til)
    end
  end
end
local function reap_dead(now_ms)
  local n = 0
  local dead = redis.call('ZRANGEBYSCORE', P..':nodes', '-inf', now_ms, 'LIMIT', 0, 16)
  for _, d in ipairs(dead) do
    n = n + requeue_node(d)
    redis.call('ZREM', P..':nodes', d)
    redis.call('HDEL', P..':graced', d)
  end
  return n
end
-- How a claim shares its room between campaigns: spool/fair.py's fill() and
-- fair_shares(), the same arithmetic (tests/test_spool_fairness.py holds them
-- equal). fill(): water-filling of limit by weights w, none above its a[i];
-- the odd ones (m) one each from the live member turn * m % live.
local function fill(limit, w, a, turn)
  local give, live, left = {}, {}, limit
  for i = 1, #a do
    give[i] = 0
    if a[i] > 0 then live[#live + 1] = i end
  end
  local function still()
    local nl = {}
    for _, i in ipairs(live) do
      if give[i] < a[i] then nl[#nl + 1] = i end
    end
    return nl
  end
  while left > 0 and #live > 0 do
    local total, moved = 0, 0
    for _, i in ipairs(live) do total = total + w[i] end
    for _, i in ipairs(live) do
      local q = math.min(math.floor(left * w[i] / total), a[i] - give[i])
      give[i] = give[i] + q
      moved = moved + q
    end
    left = left - moved
    live = still()
    if moved == 0 then
      local k = #live
      local m = math.min(k, left)
      local start = (turn * m) % k
      for j = 0, m - 1 do
        local i = live[(start + j) % k + 1]
        give[i] = give[i] + 1
      end
      left = left - m
      live = still()
    end
  end
  return give
end
-- cands: {{cid (number), tenant, priority, weight, due (<= limit)}, ...} ->
-- {{cid, n}, ...}: the tenants alike (or by tw[tenant], the operator's tenant
-- weights; nil: all 1), then a tenant's highest priority first, then by
-- weight (see spool/fair.py)
local function fair_shares(cands, limit, turn, tw)
  local ids, of = {}, {}  -- (by campaign id: a sort of numbers, no Lua comparator)
  for i, c in ipairs(cands) do ids[i] = c[1]; of[c[1]] = c end
  table.sort(ids)
  local by, order = {}, {}
  for _, id in ipairs(ids) do
    local c = of[id]
    local t = by[c[2]]
    if t == nil then t = {}; by[c[2]] = t; order[#order + 1] = t end
    t[#t + 1] = c
  end
  local tws, due = {}, {}
  for j, t in ipairs(order) do
    tws[j], due[j] = (tw and tw[t[1][2]]) or 1, 0
    for _, c in ipairs(t) do due[j] = due[j] + c[5] end
  end
  local got = fill(limit, tws, due, turn)
  local out = {}
  for j, camps in ipairs(order) do
    local room = got[j]
    if room == 1 and #camps > 1 then  -- (what fill gives one message, cheaper: fair.py)
      local top, live = nil, {}
      for _, c in ipairs(camps) do
        if c[5] > 0 and (top == nil or c[3] > top) then top = c[3] end
      end
      for _, c in ipairs(camps) do
        if c[5] > 0 and c[3] == top then live[#live + 1] = c end
      end
      out[#out + 1] = {live[turn % #live + 1][1], 1}
    elseif room > 0 then
      local prios, seen = {}, {}
      for _, c in ipairs(camps) do
        if not seen[c[3]] then seen[c[3]] = true; prios[#prios + 1] = c[3] end
      end
      table.sort(prios, function(x, y) return x > y end)
      for _, p in ipairs(prios) do
        if room <= 0 then break end
        local tier, w, a = {}, {}, {}
        for _, c in ipairs(camps) do
          if c[3] == p then tier[#tier + 1] = c; w[#w + 1] = c[4]; a[#a + 1] = c[5] end
        end
        local give = fill(room, w, a, turn)
        for i, c in ipairs(tier) do
          if give[i] > 0 then out[#out + 1] = {c[1], give[i]} end
          room = room - give[i]
        end
      end
    end
  end
  return out
end
