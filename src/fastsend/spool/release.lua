-- ARGV: P, node, ids...: only messages this node holds (after its lease expired
-- another node may hold them now: releasing those would send them twice)
local ids = {}
for i = 3, #ARGV do ids[#ids + 1] = ARGV[i] end
local n = put_back(ids, ARGV[2], true)
each_chunk('SREM', P..':fl:'..ARGV[2], ids)
return n
