-- Prepended to every spool script at load: P is the key prefix (ARGV[1]);
-- move()/tally() keep the per-state counters; requeue_node()/reap_dead() take back
-- the in-flight window of a node (whose lease expired).
local P = ARGV[1]
local function move(cid, old, new)
  if old == new then return end
  if old then
    redis.call('HINCRBY', P..':n:'..cid, old, -1)
    redis.call('HINCRBY', P..':n', old, -1)
  end
  redis.call('HINCRBY', P..':n:'..cid, new, 1)
  redis.call('HINCRBY', P..':n', new, 1)
end
local function clock_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function requeue_node(node)
  local fl = P..':fl:'..node
  local ids = redis.call('SMEMBERS', fl)
  local n = 0
  for _, id in ipairs(ids) do
    local k = P..':m:'..id
    local f = redis.call('HMGET', k, 's', 'c', 'n', 'o')
    if f[1] == '1' and f[4] == node then
      redis.call('HSET', k, 's', '0')
      redis.call('HDEL', k, 'o')
      redis.call('ZADD', P..':due:'..f[2], f[3], id)
      move(f[2], '1', '0')
      n = n + 1
    end
  end
  redis.call('DEL', fl)
  -- Taken back from a node that did not finish: some may have been delivered
  -- already and are sent again (the duplicates the issue bounds by the window).
  if n > 0 then redis.call('HINCRBY', P..':stats', 'taken_over', n) end
  return n
end
-- Counter moves of a batch, summed: tally(cid, old, new) per message, then
-- flush_tally() writes one HINCRBY per (campaign, state) touched (not per message).
local tally_t = {}
local function tally(cid, old, new)
  if old == new then return end
  local t = tally_t[cid]
  if t == nil then t = {}; tally_t[cid] = t end
  if old then t[old] = (t[old] or 0) - 1 end
  t[new] = (t[new] or 0) + 1
end
local function flush_tally()
  local all = {}
  for cid, t in pairs(tally_t) do
    for st, d in pairs(t) do
      if d ~= 0 then
        redis.call('HINCRBY', P..':n:'..cid, st, d)
        all[st] = (all[st] or 0) + d
      end
    end
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
local function reap_dead(now_ms)
  local n = 0
  local dead = redis.call('ZRANGEBYSCORE', P..':nodes', '-inf', now_ms, 'LIMIT', 0, 16)
  for _, d in ipairs(dead) do
    n = n + requeue_node(d)
    redis.call('ZREM', P..':nodes', d)
  end
  return n
end
