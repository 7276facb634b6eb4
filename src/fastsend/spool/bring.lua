-- ARGV: P, domain, then (id, updated, next_at) triples -> how many brought forward
-- RedisSpool.bring_forward: each message still deferred (state 2), unclaimed
-- and last updated at ``updated`` (none recorded since the pick) is due at its
-- new next_at (its campaign's due set and index with it), out of P:dfr:DOMAIN.
local key = P..':dfr:'..ARGV[2]
local ids, want = {}, {}
for i = 3, #ARGV, 3 do
  ids[#ids + 1] = ARGV[i]
  want[ARGV[i]] = {ARGV[i + 1], ARGV[i + 2]}
end
local rows, n, drop = {}, 0, {}
local got = states(ids)
for _, id in ipairs(ids) do
  local f, w = got[id], want[id]
  if f and f[1] == '2' and f[6] == '' and f[4] == w[1] then
    f[3] = w[2]
    rows[#rows + 1] = {id, f}
    zadd_later(P..':due:'..f[5], w[2], id)
    n = n + 1
    drop[#drop + 1] = id
  elseif not f or f[1] ~= '2' then
    drop[#drop + 1] = id  -- (deferred again since: its new entry kept)
  end
end
put_states(rows)
flush_zadd()
each_chunk('ZREM', key, drop)
return n
