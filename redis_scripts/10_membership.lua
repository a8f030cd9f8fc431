--[[
kvpool_version
  KEYS: none          ARGV: none
  reply: LIBRARY_VERSION (integer)
]]
redis.register_function{function_name = 'kvpool_version', flags = {'no-writes'},
  callback = function() return LIBRARY_VERSION end}

--[[
kvpool_join: a node enters the cluster with a fresh incarnation (fencing token). A node id that is
already a member is superseded: its old incarnation can no longer heartbeat, publish or leave.
  KEYS: meta, nodes, leases, stats
  ARGV: node_id, address, transports (comma list), capacity_bytes, ttl_ms
  reply: {incarnation, epoch} | -1
]]
redis.register_function('kvpool_join', function(keys, argv)
  local node_id, address, transports = argv[1], argv[2], argv[3]
  local capacity, ttl = tonumber(argv[4]), tonumber(argv[5])
  if not node_id or node_id == '' or not address or not capacity or not ttl or ttl <= 0
      or string.find(node_id, '[|@,]') then
    return E_BAD_ARGS
  end
  reap(keys[1], keys[2], keys[3], keys[4])
  local now = now_ms()
  if rcall('HEXISTS', keys[1], 'next_incarnation') == 0 then
    -- A new (or emptied) cluster counts from the clock, so incarnations and epochs never repeat
    -- values handed out before Redis lost its data: stale views and zombie nodes stay fenced.
    rcall('HSET', keys[1], 'next_incarnation', now, 'epoch', math.max(now, epoch(keys[1])))
  end
  local inc = rcall('HINCRBY', keys[1], 'next_incarnation', 1)
  rcall('HSET', keys[2], node_id, table.concat({inc, address, transports or '', capacity, now}, '|'))
  rcall('ZADD', keys[3], now + ttl, node_id)
  local ep = rcall('HINCRBY', keys[1], 'epoch', 1)
  return {inc, ep}
end)

--[[
kvpool_heartbeat: extends the lease of the node's current incarnation and records its stats.
  KEYS: meta, nodes, leases, stats
  ARGV: node_id, incarnation, ttl_ms, used_bytes, blocks, hits, misses
  reply: epoch | -1 | -2 (superseded) | -3 (unknown or lease expired: join again)
]]
redis.register_function('kvpool_heartbeat', function(keys, argv)
  local node_id, inc, ttl = argv[1], tonumber(argv[2]), tonumber(argv[3])
  if not node_id or not inc or not ttl or ttl <= 0 then return E_BAD_ARGS end
  reap(keys[1], keys[2], keys[3], keys[4])
  local current = node_incarnation(keys[2], node_id)
  if not current then return E_NOT_MEMBER end
  if current ~= inc then return E_FENCED end
  local now = now_ms()
  rcall('ZADD', keys[3], 'XX', now + ttl, node_id)
  rcall('HSET', keys[4], node_id, table.concat({argv[4] or 0, argv[5] or 0, argv[6] or 0, argv[7] or 0, now}, '|'))
  return epoch(keys[1])
end)

--[[
kvpool_leave: the node leaves (clean shutdown).
  KEYS: meta, nodes, leases, stats
  ARGV: node_id, incarnation
  reply: epoch | -1 | -2 | -3
]]
redis.register_function('kvpool_leave', function(keys, argv)
  local node_id, inc = argv[1], tonumber(argv[2])
  if not node_id or not inc then return E_BAD_ARGS end
  local current = node_incarnation(keys[2], node_id)
  if not current then return E_NOT_MEMBER end
  if current ~= inc then return E_FENCED end
  rcall('HDEL', keys[2], node_id)
  rcall('ZREM', keys[3], node_id)
  rcall('HDEL', keys[4], node_id)
  return rcall('HINCRBY', keys[1], 'epoch', 1)
end)

--[[
kvpool_members: the live members, after reaping expired leases atomically.
  KEYS: meta, nodes, leases, stats
  ARGV: none
  reply: {epoch, {node_id, "incarnation|address|transports|capacity|joined_ms", lease_expiry_ms}...}
]]
redis.register_function('kvpool_members', function(keys)
  reap(keys[1], keys[2], keys[3], keys[4])
  local out = {epoch(keys[1])}
  local all = rcall('HGETALL', keys[2])
  for i = 1, #all, 2 do
    out[#out + 1] = {all[i], all[i + 1], tonumber(rcall('ZSCORE', keys[3], all[i]))}
  end
  return out
end)

--[[
kvpool_epoch: the cluster epoch; it moves whenever membership changes (leases that expired but
were not yet reaped do not move it until the next members/join/heartbeat call reaps them).
  KEYS: meta
  reply: epoch
]]
redis.register_function{function_name = 'kvpool_epoch', flags = {'no-writes'},
  callback = function(keys) return epoch(keys[1]) end}

--[[
kvpool_stats: per-node capacity and usage as last reported by heartbeats.
  KEYS: meta, nodes, leases, stats
  reply: {epoch, {node_id, "incarnation|address|transports|capacity|joined_ms",
                  "used_bytes|blocks|hits|misses|updated_ms" or false}...}
]]
redis.register_function{function_name = 'kvpool_stats', flags = {'no-writes'},
  callback = function(keys)
    local out = {epoch(keys[1])}
    local all = rcall('HGETALL', keys[2])
    for i = 1, #all, 2 do
      out[#out + 1] = {all[i], all[i + 1], rcall('HGET', keys[4], all[i])}
    end
    return out
  end}
