-- ARGV: P, cid, n: cancel up to n pending messages of a (non-active) campaign
local cid, due = ARGV[2], P..':due:'..ARGV[2]
local ids = redis.call('ZRANGE', due, 0, tonumber(ARGV[3]) - 1)
local rows = {}
local now = tostring(clock_ms() / 1000)  -- updated: kept final_retention_days from now
for id, f in pairs(states(ids)) do
  if f[1] == '0' or f[1] == '2' then
    tally(cid, f[1], '7')
    f[1], f[3], f[4] = '7', '0', now
    rows[#rows + 1] = {id, f}
  end
end
put_states(rows)
flush_tally()
if #ids > 0 then redis.call('ZREMRANGEBYRANK', due, 0, #ids - 1) end
return #ids
