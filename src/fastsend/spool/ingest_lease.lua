-- One reader per ingest job: a lease key holding the reader's tag (JSON: pid,
-- host, start time), expiring unless renewed.
-- ARGV: P, op ("hold" | "renew" | "release"), job id, tag, lease_ms, [stale tag]
-- hold: set when free, ours, or still the stale tag the caller judged dead;
--       returns false when taken, else the holder's tag.
-- renew: extend if still ours (1), else 0.  release: delete if ours.
local k = P..':ing:'..ARGV[3]..':lease'
local op, tag = ARGV[2], ARGV[4]
local cur = redis.call('GET', k)
if op == 'hold' then
  if (not cur) or cur == tag or (ARGV[6] and ARGV[6] ~= '' and cur == ARGV[6]) then
    redis.call('SET', k, tag, 'PX', tonumber(ARGV[5]))
    return false
  end
  return cur
elseif op == 'renew' then
  if cur == tag then
    redis.call('PEXPIRE', k, tonumber(ARGV[5]))
    return 1
  end
  return 0
elseif op == 'release' then
  if cur == tag then redis.call('DEL', k) end
  return 0
end
return redis.error_reply('bad op')
