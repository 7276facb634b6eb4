-- ARGV: P, now, node, lease_ms, JSON [[id, state, attempts, next_at, code, enhanced, text], ...]
-- (every value a string: one argument, decoded by cjson in the script), then
-- event records (JSON) for the webhook outbox P:wh, appended in this same call
-- -> the outbox id of the first event (0: none)
-- Per bucket of ids one HMGET and one HSET (the owner is cleared there); the
-- due set only for a retry (or a message no longer in flight); SREM and
-- counters per batch.
local now = ARGV[2]
if ARGV[3] ~= '' then redis.call('ZADD', P..':nodes', 'XX', clock_ms() + tonumber(ARGV[4]), ARGV[3]) end
local rows = cjson.decode(ARGV[5])
local ids = {}
for i, row in ipairs(rows) do ids[i] = row[1] end
local st = states(ids)
local gone, owners, out = {}, {}, {}
for _, row in ipairs(rows) do
  local id = row[1]
  local f = st[id]
  st[id] = nil  -- an id twice in one batch: its first outcome counts
  if f then
    local old, cid, owner = f[1], f[5], f[6]
    local new, nxt = row[2], row[4]
    -- deferred after its campaign was cancelled: final too (never claimed again)
    if new == '2' and is_cancelled(cid) then new, nxt = '7', '0' end
    out[#out + 1] = {id, {new, row[3], nxt, now, cid, '', row[5]..'|'..row[6]..'|'..row[7]}}
    if owner ~= '' then
      local g = gone[owner]
      if g == nil then g = {}; gone[owner] = g; owners[#owners + 1] = owner end
      g[#g + 1] = id
    end
    if new == '0' or new == '2' then
      zadd_later(P..':due:'..cid, nxt, id)
    elseif old == '0' or old == '2' then
      redis.call('ZREM', P..':due:'..cid, id)  -- requeued meanwhile: final now
    end
    tally(cid, old, new)
  end
end
put_states(out)
flush_zadd()
for _, owner in ipairs(owners) do each_chunk('SREM', P..':fl:'..owner, gone[owner]) end
flush_tally()
local n = #ARGV - 5
if n <= 0 then return 0 end
local first = redis.call('INCRBY', P..':wh:seq', n) - n + 1
local z = {}
for i = 1, n do
  z[#z + 1] = first + i - 1
  z[#z + 1] = (first + i - 1)..':'..ARGV[5 + i]
end
each_chunk('ZADD', P..':wh', z)
return first
