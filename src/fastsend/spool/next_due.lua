-- ARGV: P, node -> earliest due time of an active campaign's pending message, or
-- the earliest lease deadline of another node holding messages in flight (they
-- come back when it expires), as a string; nil when neither.
-- (the index P:dueidx: lib.lua; a score in it is at most its campaign's head,
-- so the answer is never later than the mail: at worst a claim finds nothing)
-- Another node's `send` campaigns (P:own, claim.lua) are passed over: the first
-- of the index's 100 first that is not one (all 100 are: the 100th's, early at worst).
local best = nil
if redis.call('HLEN', P..':own') == 0 then
  local r = redis.call('ZRANGE', P..':dueidx', 0, 0, 'WITHSCORES')
  if r[2] then best = tonumber(r[2]) end
else
  local r = redis.call('ZRANGE', P..':dueidx', 0, 99, 'WITHSCORES')
  if #r > 0 then
    local ids = {}
    for i = 1, #r, 2 do ids[#ids + 1] = r[i] end
    local own = redis.call('HMGET', P..':own', unpack(ids))
    best = tonumber(r[#r])
    for i = 1, #ids do
      if not own[i] or own[i] == ARGV[2] then
        best = tonumber(r[2 * i])
        break
      end
    end
  end
end
local nodes = redis.call('ZRANGE', P..':nodes', 0, -1, 'WITHSCORES')
for i = 1, #nodes, 2 do
  if nodes[i] ~= ARGV[2] and redis.call('SCARD', P..':fl:'..nodes[i]) > 0 then
    local s = tonumber(nodes[i + 1]) / 1000
    if best == nil or s < best then best = s end
  end
end
if best == nil then return false end
return string.format('%.6f', best)
