-- Idempotency keys (Spool.idem_begin): a hash per (tenant, key) at P:idem:HEX
-- (HEX: SHA-256 of tenant NUL key, so any key text is safe and one tenant's key
-- never names another's), fields fp, holder, status ('0': running), body,
-- created, expires; it expires ttl after the reservation (Redis sweeps it).
-- ARGV: P, op, HEX, holder, then
--   begin: fp, ttl_ms, created, [stale holder] -> false when reserved for the
--          caller (absent, or running under the stale holder), else
--          {fp, holder, created, status, body}
--   finish: status, body -> 1 when still ours
--   drop: delete when ours and still running
local k = P..':idem:'..ARGV[3]
local op, holder = ARGV[2], ARGV[4]
if op == 'begin' then
  local cur = redis.call('HMGET', k, 'fp', 'holder', 'created', 'status', 'body', 'expires')
  local live = cur[1] and tonumber(cur[6]) > tonumber(ARGV[7])
  if live and not (ARGV[8] and ARGV[8] ~= '' and cur[4] == '0' and cur[2] == ARGV[8]) then
    return {cur[1], cur[2], cur[3], cur[4], cur[5]}
  end
  redis.call('DEL', k)
  redis.call('HSET', k, 'fp', ARGV[5], 'holder', holder, 'created', ARGV[7], 'status', '0', 'body', '',
    'expires', tostring(tonumber(ARGV[7]) + tonumber(ARGV[6]) / 1000))
  redis.call('PEXPIRE', k, tonumber(ARGV[6]))
  return false
elseif op == 'finish' then
  if redis.call('HGET', k, 'holder') == holder then
    redis.call('HSET', k, 'status', ARGV[5], 'body', ARGV[6])
    return 1
  end
  return 0
elseif op == 'drop' then
  local cur = redis.call('HMGET', k, 'holder', 'status')
  if cur[1] == holder and cur[2] == '0' then redis.call('DEL', k) end
  return 0
end
return redis.error_reply('bad op')
