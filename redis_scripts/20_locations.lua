--[[
kvpool_fence: tells one index partition a node's newest incarnation (called by the node for
every partition right after it joins, before it publishes). Incarnations only move forward.
  KEYS: fence (kvpool:{C/p}:fence)
  ARGV: node_id, incarnation
  reply: the partition's incarnation for the node after the call
]]
redis.register_function('kvpool_fence', function(keys, argv)
  local node_id, inc = argv[1], tonumber(argv[2])
  if not node_id or not inc then return E_BAD_ARGS end
  local current = tonumber(rcall('HGET', keys[1], node_id) or '0')
  if inc > current then
    rcall('HSET', keys[1], node_id, inc)
    return inc
  end
  return current
end)

local function remove_entry(list, entry_prefix)
  local kept = {}
  for _, e in ipairs(split(list, ',')) do
    if string.sub(e, 1, #entry_prefix) ~= entry_prefix then kept[#kept + 1] = e end
  end
  return kept
end

--[[
kvpool_publish: records that a node committed blocks and evicted others, in one batch.
  KEYS: loc (kvpool:{C/p}:loc), fence (kvpool:{C/p}:fence)
  ARGV: node_id, incarnation, n_added, added keys..., removed keys...
  reply: number of keys changed | -1 | -2 (the partition knows a newer incarnation of the node)
]]
redis.register_function('kvpool_publish', function(keys, argv)
  local node_id, inc, n_added = argv[1], tonumber(argv[2]), tonumber(argv[3])
  if not node_id or not inc or not n_added or n_added < 0 or 3 + n_added > #argv then
    return E_BAD_ARGS
  end
  local fence = tonumber(rcall('HGET', keys[2], node_id) or '0')
  if inc < fence then return E_FENCED end
  if inc > fence then rcall('HSET', keys[2], node_id, inc) end
  local prefix = node_id .. '@'
  local entry = prefix .. inc
  local changed = 0
  for i = 4, 3 + n_added do
    local list = rcall('HGET', keys[1], argv[i])
    local kept = list and remove_entry(list, prefix) or {}
    kept[#kept + 1] = entry
    rcall('HSET', keys[1], argv[i], table.concat(kept, ','))
    changed = changed + 1
  end
  for i = 4 + n_added, #argv do
    local list = rcall('HGET', keys[1], argv[i])
    if list then
      local kept = remove_entry(list, prefix)
      if #kept == 0 then rcall('HDEL', keys[1], argv[i]) else rcall('HSET', keys[1], argv[i], table.concat(kept, ',')) end
      changed = changed + 1
    end
  end
  return changed
end)

--[[
kvpool_lookup: where each key is, as published (callers keep only live node@incarnation entries).
  KEYS: loc
  ARGV: block keys...
  reply: one "node@incarnation[,...]" string or false per key
]]
redis.register_function{function_name = 'kvpool_lookup', flags = {'no-writes'},
  callback = function(keys, argv)
    if #argv == 0 then return {} end
    return rcall('HMGET', keys[1], unpack(argv))
  end}

--[[
kvpool_gc: drops entries of incarnations that are not live, one HSCAN page per call.
  KEYS: loc
  ARGV: cursor, count, then live "node@incarnation" entries; an argument ">N" instead keeps
        every incarnation greater than N (nodes that joined after the caller read the members)
  reply: {next cursor ("0" when done), entries removed} | -1
]]
redis.register_function('kvpool_gc', function(keys, argv)
  local cursor, count = argv[1], tonumber(argv[2])
  if not cursor or not count or count <= 0 then return E_BAD_ARGS end
  local live, newer_than = {}, math.huge
  for i = 3, #argv do
    if string.sub(argv[i], 1, 1) == '>' then
      newer_than = tonumber(string.sub(argv[i], 2)) or math.huge
    else
      live[argv[i]] = true
    end
  end
  local page = rcall('HSCAN', keys[1], cursor, 'COUNT', count)
  local removed = 0
  local fields = page[2]
  for i = 1, #fields, 2 do
    local kept = {}
    local entries = split(fields[i + 1], ',')
    for _, e in ipairs(entries) do
      local inc = tonumber(string.match(e, '@(%d+)$') or '0')
      if live[e] or inc > newer_than then kept[#kept + 1] = e end
    end
    if #kept < #entries then
      removed = removed + #entries - #kept
      if #kept == 0 then rcall('HDEL', keys[1], fields[i]) else rcall('HSET', keys[1], fields[i], table.concat(kept, ',')) end
    end
  end
  return {page[1], removed}
end)
