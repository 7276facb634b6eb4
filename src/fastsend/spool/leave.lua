-- ARGV: P, node: forget this node if it holds nothing (a clean exit); what it
-- recorded and could not tell (its event log unwritable at the end) is left
-- for any node to tell (a node forgotten here is never reaped)
if redis.call('SCARD', P..':fl:'..ARGV[2]) == 0 then
  redis.call('ZREM', P..':nodes', ARGV[2])
  redis.call('HDEL', P..':graced', ARGV[2])
  orphan_untold(ARGV[2])
end
return 0
