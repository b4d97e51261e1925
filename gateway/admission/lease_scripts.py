"""The Lua scripts behind global concurrency leases (redis_semaphore.py): each one atomic."""

# KEYS: 1 leases (zset id -> expiry ms), 2 units (hash id -> units), 3 queue (zset id -> seq),
# 4 queue expiry (zset id -> expiry ms), 5 queue sequence (counter).
# ARGV: 1 lease id, 2 units, 3 capacity, 4 lease ttl ms, 5 ticket ttl ms,
# 6 "1" to take (or keep) a place in the queue when not granted, 7 release channel.
# Returns {granted 0|1, units in use}. A grant to the queue's head that leaves room announces
# it, so the next head (maybe on another replica) asks at once.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  redis.call('HDEL', KEYS[2], id)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)) do
  redis.call('ZREM', KEYS[3], id)
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local used = 0
for _, units in ipairs(redis.call('HVALS', KEYS[2])) do
  used = used + tonumber(units)
end
local id, units = ARGV[1], tonumber(ARGV[2])
local lease_ttl, ticket_ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
if (not head or head == id) and used + units <= tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], now + lease_ttl, id)
  redis.call('HSET', KEYS[2], id, units)
  redis.call('PEXPIRE', KEYS[1], 2 * lease_ttl)
  redis.call('PEXPIRE', KEYS[2], 2 * lease_ttl)
  if head then
    redis.call('ZREM', KEYS[3], id)
    redis.call('ZREM', KEYS[4], id)
    if used + units < tonumber(ARGV[3]) and redis.call('ZCARD', KEYS[3]) > 0 then
      redis.call('PUBLISH', ARGV[7], '')
    end
  end
  return {1, used + units}
end
if ARGV[6] == '1' then
  if not redis.call('ZSCORE', KEYS[3], id) then
    redis.call('ZADD', KEYS[3], redis.call('INCR', KEYS[5]), id)
  end
  redis.call('ZADD', KEYS[4], now + ticket_ttl, id)
  for i = 3, 5 do redis.call('PEXPIRE', KEYS[i], 2 * ticket_ttl) end
end
return {0, used}
"""

# KEYS as ACQUIRE. ARGV: 1 release channel, then lease ids. Gives back leases and queue places
# (idempotent), and announces it when someone is queued.
RELEASE = """
for i = 2, #ARGV do
  redis.call('ZREM', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[2], ARGV[i])
  redis.call('ZREM', KEYS[3], ARGV[i])
  redis.call('ZREM', KEYS[4], ARGV[i])
end
if redis.call('ZCARD', KEYS[3]) > 0 then
  redis.call('PUBLISH', ARGV[1], '')
end
return 1
"""

# KEYS: 1 leases, 2 units. ARGV: lease ttl ms, then lease id, units pairs. Upsert.
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], 2 * ttl)
redis.call('PEXPIRE', KEYS[2], 2 * ttl)
return 1
"""
