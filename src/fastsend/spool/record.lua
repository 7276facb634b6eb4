-- ARGV: P, now, node, lease_ms, JSON [[id, state, attempts, next_at, code, enhanced, text], ...]
-- (every value a string: one argument, decoded by cjson in the script)
-- Per message: one HMGET and one HSET (the owner is cleared there); the due set
-- only for a retry (or a message no longer in flight); SREM and counters per batch.
local now = ARGV[2]
if ARGV[3] ~= '' then redis.call('ZADD', P..':nodes', 'XX', clock_ms() + tonumber(ARGV[4]), ARGV[3]) end
local gone = {}
local cancelled = {}
local rows = cjson.decode(ARGV[5])
for _, row in ipairs(rows) do
  local id = row[1]
  local k = P..':m:'..id
  local f = redis.call('HMGET', k, 's', 'c', 'o')
  if f[1] then
    local new, nxt = row[2], row[4]
    -- deferred after its campaign was cancelled: final too (never claimed again)
    if new == '2' then
      local c = cancelled[f[2]]
      if c == nil then
        c = redis.call('HGET', P..':c:'..f[2], 'status') == 'cancelled'
        cancelled[f[2]] = c
      end
      if c then new, nxt = '7', '0' end
    end
    redis.call('HSET', k, 's', new, 'a', row[3], 'n', nxt, 'u', now,
               'lc', row[5], 'le', row[6], 'lt', row[7], 'o', '')
    if f[3] and f[3] ~= '' then
      local g = gone[f[3]]
      if g == nil then g = {}; gone[f[3]] = g end
      g[#g + 1] = id
    end
    if new == '0' or new == '2' then
      redis.call('ZADD', P..':due:'..f[2], nxt, id)
    elseif f[1] == '0' or f[1] == '2' then
      redis.call('ZREM', P..':due:'..f[2], id)  -- requeued meanwhile: final now
    end
    tally(f[2], f[1], new)
  end
end
for owner, g in pairs(gone) do each_chunk('SREM', P..':fl:'..owner, g) end
flush_tally()
return 0
