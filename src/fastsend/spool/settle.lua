-- ARGV: P, mode, text, ttl, node, id... (RedisSpool.settle / settle_taken)
-- "event": a provider's event shows it has these messages. Those deferred and
-- not claimed (state 2, no owner) are delivered now (250 2.0.0 text; out of
-- their campaign's due set, counted); for those in flight (state 1) the text
-- is kept in P:taken:ID for ttl seconds, for the outcome still to come. -> the
-- ids delivered.
-- "taken": these messages were just recorded deferred (outcome unknown): those
-- with a P:taken:ID are delivered with its text, the key dropped. -> {id, text, ...}
-- Each message delivered is noted untold (P:untold:NODE, as record.lua's
-- outcomes) in this same call: a kill before the "delivered" event is in the
-- node's event log leaves it to the next start (untold), never a delivery no
-- event tells.
local mode, text, ttl = ARGV[2], ARGV[3], tonumber(ARGV[4])
local ids = {}
local node = ARGV[5]
for i = 6, #ARGV do ids[#ids + 1] = ARGV[i] end
local now = tostring(clock_ms() / 1000)
local rows, out = {}, {}
for id, f in pairs(states(ids)) do
  local why = text
  if mode == 'taken' then
    why = redis.call('GET', P..':taken:'..id)
    -- (dropped only when it settles: claimed again meanwhile, its next unknown
    -- outcome may still be settled by it)
    if why and f[1] == '2' and f[6] == '' then redis.call('DEL', P..':taken:'..id) end
  elseif f[1] == '1' then
    redis.call('SET', P..':taken:'..id, text, 'EX', ttl)
  end
  if why and f[1] == '2' and f[6] == '' then
    tally(f[5], '2', '3')
    redis.call('ZREM', P..':due:'..f[5], id)
    f[1], f[3], f[4], f[7] = '3', '0', now, '250|2.0.0|'..why
    rows[#rows + 1] = {id, f}
    out[#out + 1] = id
    if mode == 'taken' then out[#out + 1] = why end
  end
end
put_states(rows)
flush_tally()
if node ~= '' and #rows > 0 then
  local notes = {}
  for _, r in ipairs(rows) do notes[#notes + 1] = r[1]..'/'..r[2][2] end
  redis.call('RPUSH', P..':untold:'..node, table.concat(notes, ',')..'||0')
end
return out
