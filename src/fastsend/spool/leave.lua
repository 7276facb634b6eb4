-- ARGV: P, node: forget this node if it holds nothing (a clean exit)
if redis.call('SCARD', P..':fl:'..ARGV[2]) == 0 then
  redis.call('ZREM', P..':nodes', ARGV[2])
  redis.call('HDEL', P..':graced', ARGV[2])
end
return 0
