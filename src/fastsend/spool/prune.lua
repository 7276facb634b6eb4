-- ARGV: P, before, mode, n, [bucket, ...] -> {deleted, more}
-- Spool.prune_final: delete the final messages (states 3-7) last changed
-- before ``before`` (both fields of each; the per-state counters stay: counts
-- never come from rows). mode 'next': up to n buckets from P:prune's 'next'
-- on, oldest first, stopping at the bucket of a message spooled at ``before``
-- or later (too young: the sweep ends there) or at the last id's bucket (looked
-- at, never passed: more ids will come in it); a bucket left with messages goes to P:prune:keep, to
-- be looked at again by mode 'keep' (the buckets given) at later sweeps.
-- A campaign's fingerprints of its addresses (P:fp:CID, its duplicates: as
-- SQLite reads them from its rows) go with its last row: P:pruned counts the
-- rows pruned per campaign; once they are all its rows (its counters' sum),
-- the set is deleted (it had a fixed 30 days: a campaign taking chunks after
-- a month took its old addresses again, and a set outlived rows kept longer);
-- mode 'fps' finds the sets whose rows another version's prune deleted.
local before = tonumber(ARGV[2])
local pruned = {}
local final = {['3'] = true, ['4'] = true, ['5'] = true, ['6'] = true, ['7'] = true}
local sub, match = string.sub, string.match
-- (deleted, kept, young) of one bucket
local function prune_bucket(b)
  local key = P..':m:'..b
  local h = redis.call('HGETALL', key)
  if #h == 0 then return 0, 0, false end
  local rows = {}
  for i = 1, #h, 2 do
    if sub(h[i], -1) ~= 's' then rows[h[i]] = h[i + 1] end
  end
  local del, kept, young = {}, 0, false
  for i = 1, #h, 2 do
    local f = h[i]
    if sub(f, -1) == 's' then
      local id = sub(f, 1, -2)
      local v = parse(h[i + 1])
      local row = rows[id]
      local created = row and tonumber(match(row, '^[^%z]*%z[^%z]*%z([^%z]*)')) or 0
      if created >= before then young = true end
      if final[v[1]] and tonumber(v[4]) < before and created < before then
        del[#del + 1] = id
        del[#del + 1] = f
        pruned[v[5]] = (pruned[v[5]] or 0) + 1
      else
        kept = kept + 1
      end
    end
  end
  if #del > 0 then each_chunk('HDEL', key, del) end
  return #del / 2, kept, young
end
local function forget_fps()
  for cid, d in pairs(pruned) do
    local gone = redis.call('HINCRBY', P..':pruned', cid, d)
    local rows = 0
    for _, v in ipairs(redis.call('HVALS', P..':n:'..cid)) do rows = rows + tonumber(v) end
    if gone >= rows then
      redis.call('DEL', P..':fp:'..cid)
      redis.call('ZREM', P..':fplast', cid)
    end
  end
end
local n = tonumber(ARGV[4])
local deleted = 0
-- mode 'fps': the sets whose campaign's rows went without P:pruned counting them
-- (a node of an older fastsend pruned some or all: its prune.lua keeps no
-- count and deletes no set, so the set was kept for ever). P:fplast holds each
-- campaign with a set, scored by its last id (add_messages, ZADD GT); one whose
-- last id is below the cursor's bucket had every row looked at by some node's
-- prune: deleted, or left in a kept bucket. Its set goes when it has no
-- pending or in-flight message (its counters) and no row in a kept bucket (up
-- to 32 looked at; more: looked at again the next sweep). n campaigns a call,
-- from P:fplast:at on -> {deleted sets, more}
if ARGV[3] == 'fps' then
  local nxt = tonumber(redis.call('HGET', P..':prune', 'next') or '0')
  local at = redis.call('GET', P..':fplast:at')
  local got = redis.call('ZRANGEBYSCORE', P..':fplast', at and ('('..at) or '-inf',
    '('..(nxt * B), 'WITHSCORES', 'LIMIT', 0, n)
  if #got == 0 then
    redis.call('DEL', P..':fplast:at')
    return {0, 0}
  end
  local dropped = 0
  for i = 1, #got, 2 do
    local cid, lb = got[i], math.floor(tonumber(got[i + 1]) / B)
    local left = redis.call('EXISTS', P..':fp:'..cid) == 1
    if left then
      local live = redis.call('HMGET', P..':n:'..cid, '0', '1', '2')
      local moved = redis.call('HMGET', P..':nd', cid..'|0', cid..'|1', cid..'|2')
      local pending = 0
      for j = 1, 3 do pending = pending + (tonumber(live[j]) or 0) + (tonumber(moved[j]) or 0) end
      left = pending > 0
      if not left then
        local kept = redis.call('ZRANGEBYSCORE', P..':prune:keep', '-inf', lb, 'LIMIT', 0, 33)
        left = #kept > 32
        for _, b in ipairs(kept) do
          if left then break end
          local h = redis.call('HGETALL', P..':m:'..b)
          for j = 1, #h, 2 do
            if sub(h[j], -1) == 's' and parse(h[j + 1])[5] == cid then left = true; break end
          end
        end
      end
      if not left then
        redis.call('DEL', P..':fp:'..cid)
        dropped = dropped + 1
      end
    end
    if not left then redis.call('ZREM', P..':fplast', cid) end
  end
  redis.call('SET', P..':fplast:at', got[#got])
  return {dropped, 1}
end
if ARGV[3] == 'keep' then
  for i = 5, #ARGV do
    local d, kept = prune_bucket(ARGV[i])
    deleted = deleted + d
    if kept == 0 then redis.call('ZREM', P..':prune:keep', ARGV[i]) end
  end
  forget_fps()
  return {deleted, 1}
end
local nxt = tonumber(redis.call('HGET', P..':prune', 'next') or '0')
local top = math.floor(tonumber(redis.call('GET', P..':seq:m') or '0') / B)
local more = 1
for _ = 1, n do
  if nxt > top then more = 0; break end
  local d, kept, young = prune_bucket(nxt)
  deleted = deleted + d
  if young or nxt == top then more = 0; break end  -- (more ids will come in the last)
  if kept > 0 then redis.call('ZADD', P..':prune:keep', nxt, nxt) end
  nxt = nxt + 1
end
redis.call('HSET', P..':prune', 'next', nxt)
forget_fps()
return {deleted, more}
