-- Idempotency keys (Spool.idem_begin): a hash per (tenant, key) at P:idem:HEX
-- (HEX: SHA-256 of tenant NUL key, so any key text is safe and one tenant's key
-- never names another's), fields fp, holder, status ('0': running), body,
-- created, expires, and p0, p1, ... the parts the request's attempts spooled
-- (written by add_messages in the MULTI/EXEC of their rows); it expires ttl
-- after the reservation (Redis sweeps it). P:idem:HEX:lease holds the running
-- holder's tag and expires unless renewed (Redis's clock: no skew between nodes).
-- ARGV: P, op, HEX, holder, then
--   begin: fp, ttl_ms, created, lease_ms, [stale holder] -> false when reserved
--          for the caller (absent or expired), else {fp, holder, created,
--          status, body, lease ms left, p0, p1, ...}; a record running under
--          the stale holder is taken over first (holder and lease replaced,
--          the rest kept: the caller continues after its parts)
--   renew: lease_ms -> 1 when the caller still holds the running record
--   finish: status, body -> 1 when still ours
--   drop: keep ('1': the request wrote something besides parts) -> delete when
--         ours, running, without parts and not keep; else release it (holder
--         'released', no lease: the next retry continues it)
local k = P..':idem:'..ARGV[3]
local lk = k..':lease'
local op, holder = ARGV[2], ARGV[4]
local function parts(out)
  local i = 0
  while true do
    local p = redis.call('HGET', k, 'p'..i)
    if not p then return out end
    out[#out + 1] = p
    i = i + 1
  end
end
if op == 'begin' then
  local cur = redis.call('HMGET', k, 'fp', 'holder', 'created', 'status', 'body', 'expires')
  if cur[1] and tonumber(cur[6]) > tonumber(ARGV[7]) then
    local stale = ARGV[9]
    if stale and stale ~= '' and cur[4] == '0' and cur[2] == stale then
      redis.call('HSET', k, 'holder', holder)
      redis.call('SET', lk, holder, 'PX', tonumber(ARGV[8]))
      cur[2] = holder
    end
    local left = redis.call('PTTL', lk)
    if left < 0 then left = 0 end
    return parts({cur[1], cur[2], cur[3], cur[4], cur[5], left})
  end
  redis.call('DEL', k, lk)
  redis.call('HSET', k, 'fp', ARGV[5], 'holder', holder, 'created', ARGV[7], 'status', '0', 'body', '',
    'expires', tostring(tonumber(ARGV[7]) + tonumber(ARGV[6]) / 1000))
  redis.call('PEXPIRE', k, tonumber(ARGV[6]))
  redis.call('SET', lk, holder, 'PX', tonumber(ARGV[8]))
  return false
elseif op == 'renew' then
  local cur = redis.call('HMGET', k, 'holder', 'status')
  if cur[1] == holder and cur[2] == '0' then
    redis.call('SET', lk, holder, 'PX', tonumber(ARGV[5]))
    return 1
  end
  return 0
elseif op == 'finish' then
  if redis.call('HGET', k, 'holder') == holder then
    redis.call('HSET', k, 'status', ARGV[5], 'body', ARGV[6])
    redis.call('DEL', lk)
    return 1
  end
  return 0
elseif op == 'drop' then
  local cur = redis.call('HMGET', k, 'holder', 'status', 'p0')
  if cur[1] == holder and cur[2] == '0' then
    if cur[3] or ARGV[5] == '1' then
      redis.call('HSET', k, 'holder', 'released')
      redis.call('DEL', lk)
    else
      redis.call('DEL', k, lk)
    end
  end
  return 0
end
return redis.error_reply('bad op')
