-- ARGV: P, now, node, then (id, next_at)*: handed back unattempted; only messages
-- this node holds (as release.lua); attempts and last reply unchanged
local now, node = ARGV[2], ARGV[3]
local ids, at = {}, {}
for i = 4, #ARGV, 2 do
  ids[#ids + 1] = ARGV[i]
  at[ARGV[i]] = ARGV[i + 1]
end
local rows, mine = {}, {}
for id, f in pairs(states(ids)) do
  if f[1] == '1' and (f[6] == '' or f[6] == node) then
    local new, nxt = '0', at[id]
    if f[2] ~= '0' then new = '2' end
    if is_cancelled(f[5]) then new, nxt = '7', '0' end
    if f[6] ~= '' then mine[#mine + 1] = id end
    tally(f[5], '1', new)
    f[1], f[3], f[4], f[6] = new, nxt, now, ''
    rows[#rows + 1] = {id, f}
    if new ~= '7' then zadd_later(P..':due:'..f[5], nxt, id) end
  end
end
put_states(rows)
flush_zadd()
each_chunk('SREM', P..':fl:'..node, mine)
flush_tally()
return #rows
