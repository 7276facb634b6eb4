-- ARGV: P, now, node, lease_ms, JSON [[id, state, attempts, next_at, code, enhanced, text], ...]
-- (every value a string: one argument, decoded by cjson in the script), the
-- untold node ('': none) and note, then event records (JSON) for the webhook
-- outbox P:wh, appended in this same call -> the outbox id of the first event
-- (0: none)
-- The note ("ID[-LAST]/ATTEMPTS,...|MSGID,..." : the ids recorded, and the
-- message id of each event) goes to P:untold:NODE with "|FIRST" (the first
-- event's outbox id) in this same call: the outcomes whose events the node has
-- not written to its event log yet (RedisSpool.untold; told() drops them).
-- Per bucket of ids one HMGET and one HSET (the owner is cleared there); the
-- due set only for a retry (or a message no longer in flight); SREM and
-- counters per batch.
local now = ARGV[2]
if ARGV[3] ~= '' then redis.call('ZADD', P..':nodes', 'XX', clock_ms() + tonumber(ARGV[4]), ARGV[3]) end
local byid, ids = {}, {}
for _, row in ipairs(cjson.decode(ARGV[5])) do
  if byid[row[1]] == nil then  -- an id twice in one batch: its first outcome counts
    byid[row[1]] = row
    ids[#ids + 1] = row[1]
  end
end
local gone, owners = {}, {}
local sub, find = string.sub, string.find
-- A deferral by the site (421, or an enhanced status of SITE_STATUSES: base.py)
-- goes to its domain's index P:dfr:DOMAIN (id scored by its next attempt), what
-- RedisSpool.bring_forward brings forward once the site takes mail again;
-- entries due by now are dropped there (claimed or due: nothing to bring).
local site = {['4.3.'] = true, ['4.4.'] = true, ['4.7.'] = true}
local dfr, dfr_order = {}, {}
for _, g in ipairs(group(ids)) do
  local fs = {}
  for i, id in ipairs(g[2]) do fs[i] = id..'s' end
  local v = redis.call('HMGET', g[1], unpack(fs))
  local hs = {}
  for i, id in ipairs(g[2]) do
    local st = v[i]
    if st then
      local row = byid[id]
      local old = sub(st, 1, 1)
      local p2 = find(st, '|', 3, true)
      local p3 = find(st, '|', p2 + 1, true)
      local owner, cid = sub(st, 3, p2 - 1), sub(st, p2 + 1, p3 - 1)
      local new, nxt = row[2], row[4]
      -- deferred after its campaign was cancelled: final too (never claimed again)
      if new == '2' and is_cancelled(cid) then new, nxt = '7', '0' end
      hs[#hs + 1] = id..'s'
      hs[#hs + 1] = new..'||'..cid..'|'..row[3]..'|'..nxt..'|'..now..'|'..row[5]..'|'..row[6]..'|'..row[7]
      if owner ~= '' then
        local og = gone[owner]
        if og == nil then og = {}; gone[owner] = og; owners[#owners + 1] = owner end
        og[#og + 1] = id
      end
      if new == '2' and (row[5] == '421' or site[sub(row[6], 1, 4)]) then
        local d = string.match(redis.call('HGET', g[1], id) or '', '^[^%z]*%z([^%z]*)')
        if d and d ~= '' then
          local t = dfr[d]
          if t == nil then t = {}; dfr[d] = t; dfr_order[#dfr_order + 1] = d end
          t[#t + 1] = nxt
          t[#t + 1] = id
        end
      end
      if new == '0' or new == '2' then
        zadd_later(P..':due:'..cid, nxt, id)
      elseif old == '0' or old == '2' then
        redis.call('ZREM', P..':due:'..cid, id)  -- requeued meanwhile: final now
      end
      tally(cid, old, new)
    end
  end
  if #hs > 0 then redis.call('HSET', g[1], unpack(hs)) end
end
flush_zadd()
for _, d in ipairs(dfr_order) do
  redis.call('ZREMRANGEBYSCORE', P..':dfr:'..d, '-inf', now)
  each_chunk('ZADD', P..':dfr:'..d, dfr[d])
end
for _, owner in ipairs(owners) do each_chunk('SREM', P..':fl:'..owner, gone[owner]) end
flush_tally()
local n = #ARGV - 7
local first = 0
if n > 0 then
  first = redis.call('INCRBY', P..':wh:seq', n) - n + 1
  local z = {}
  for i = 1, n do
    z[#z + 1] = first + i - 1
    z[#z + 1] = (first + i - 1)..':'..ARGV[7 + i]
  end
  each_chunk('ZADD', P..':wh', z)
end
if ARGV[6] ~= '' and #ids > 0 then
  redis.call('RPUSH', P..':untold:'..ARGV[6], ARGV[7]..'|'..first)
end
return first
