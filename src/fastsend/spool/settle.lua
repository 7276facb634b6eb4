-- ARGV: P, text, id...: of these messages, those deferred and not claimed
-- (state 2, no owner) made delivered (250 2.0.0 text; out of their campaign's
-- due set, counted): a provider's event shows it has them after a request left
-- unanswered (RedisSpool.settle). -> the ids settled
local text = ARGV[2]
local ids = {}
for i = 3, #ARGV do ids[#ids + 1] = ARGV[i] end
local now = tostring(clock_ms() / 1000)
local rows, out = {}, {}
for id, f in pairs(states(ids)) do
  if f[1] == '2' and f[6] == '' then
    tally(f[5], '2', '3')
    redis.call('ZREM', P..':due:'..f[5], id)
    f[1], f[3], f[4], f[7] = '3', '0', now, '250|2.0.0|'..text
    rows[#rows + 1] = {id, f}
    out[#out + 1] = id
  end
end
put_states(rows)
flush_tally()
return out
