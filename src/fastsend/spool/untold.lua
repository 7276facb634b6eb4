-- ARGV: P, node, dead ('1': only what dead nodes left untold, P:untold)
-- -> the entries of P:untold:NODE to tell now: with dead, those of P:untold,
-- moved to this node's own list in this call (a kill while telling them leaves
-- them to whoever takes this node's window back); else all of this node's own
-- (a start under the same node name: what its last process left untold).
local own = P..':untold:'..ARGV[2]
if ARGV[3] == '1' then
  local v = redis.call('LRANGE', P..':untold', 0, 999)
  if #v == 0 then return v end
  redis.call('LTRIM', P..':untold', #v, -1)
  each_chunk('RPUSH', own, v)
  return v
end
return redis.call('LRANGE', own, 0, -1)
