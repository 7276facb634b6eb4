-- ARGV: P, node, ids...: only messages this node holds (after its lease expired
-- another node may hold them now: releasing those would send them twice)
local node = ARGV[2]
local ids = {}
for i = 3, #ARGV do ids[#ids + 1] = ARGV[i] end
local rows, mine = {}, {}
for id, f in pairs(states(ids)) do
  if f[1] == '1' and (f[6] == '' or f[6] == node) then
    if f[6] ~= '' then mine[#mine + 1] = id end
    f[1], f[6] = '0', ''
    rows[#rows + 1] = {id, f}
    zadd_later(P..':due:'..f[5], f[3], id)
    tally(f[5], '1', '0')
  end
end
put_states(rows)
flush_zadd()
each_chunk('SREM', P..':fl:'..node, mine)
flush_tally()
return #rows
