--[[
kvpool_fence: tells one index partition a node's newest incarnation (called by the node for
every partition right after it joins, before it publishes). Incarnations only move forward. It
also writes the partition's INDEX_SENTINEL field when missing, which keeps the loc hash in
hashtable encoding (see the key layout at the top of the library).
  KEYS: loc (kvpool:{C/p}:loc), fence (kvpool:{C/p}:fence)
  ARGV: node_id, incarnation
  reply: the partition's incarnation for the node after the call | -1
]]
redis.register_function('kvpool_fence', function(keys, argv)
  local node_id, inc = argv[1], tonumber(argv[2])
  if #keys < 2 or not node_id or not inc then return E_BAD_ARGS end
  rcall('HSETNX', keys[1], INDEX_SENTINEL, INDEX_SENTINEL_VALUE)
  local current = tonumber(rcall('HGET', keys[2], node_id) or '0')
  if inc > current then
    rcall('HSET', keys[2], node_id, inc)
    return inc
  end
  return current
end)

-- The entries of a holder list other than `entry`, and whether `entry` was among them.
local function without(list, entry)
  local kept, found = {}, false
  for _, e in ipairs(split(list, ',')) do
    if e == entry then found = true else kept[#kept + 1] = e end
  end
  return kept, found
end

--[[
kvpool_publish: records that a node committed blocks and evicted others, in one batch. The
node's entry is its incarnation in base 36 (built here from the decimal ARGV). An added key gets
the entry appended to its list once (an identical entry moves to the end); a removed key loses
that entry only. Entries of the node's older incarnations stay until kvpool_gc drops them (they
are dead: readers keep only live entries).
  KEYS: loc (kvpool:{C/p}:loc), fence (kvpool:{C/p}:fence)
  ARGV: node_id, incarnation (decimal), n_added, added keys..., removed keys...
  reply: added keys + removed keys that listed the entry | -1 | -2 (the partition knows a newer
         incarnation of the node)
]]
redis.register_function('kvpool_publish', function(keys, argv)
  local node_id, inc, n_added = argv[1], incarnation_arg(argv[2]), tonumber(argv[3])
  if not node_id or not inc or not n_added or n_added < 0 or 3 + n_added > #argv then
    return E_BAD_ARGS
  end
  for i = 4, #argv do
    if argv[i] == INDEX_SENTINEL then return E_BAD_ARGS end
  end
  local fence = tonumber(rcall('HGET', keys[2], node_id) or '0')
  if inc < fence then return E_FENCED end
  if inc > fence then rcall('HSET', keys[2], node_id, inc) end
  -- Also here, not only in kvpool_fence: a loc hash recreated after a FLUSH stays a hashtable.
  rcall('HSETNX', keys[1], INDEX_SENTINEL, INDEX_SENTINEL_VALUE)
  local entry = index_entry(inc)
  local changed = 0
  for i = 4, 3 + n_added do
    local list = rcall('HGET', keys[1], argv[i])
    if list ~= entry then
      local kept = list and without(list, entry) or {}
      kept[#kept + 1] = entry
      rcall('HSET', keys[1], argv[i], table.concat(kept, ','))
    end
    changed = changed + 1
  end
  for i = 4 + n_added, #argv do
    local list = rcall('HGET', keys[1], argv[i])
    if list then
      local kept, found = without(list, entry)
      if found then
        if #kept == 0 then rcall('HDEL', keys[1], argv[i]) else rcall('HSET', keys[1], argv[i], table.concat(kept, ',')) end
        changed = changed + 1
      end
    end
  end
  return changed
end)

--[[
kvpool_lookup: where each key is, as published (callers keep only the live entries: those of
their member list's incarnations).
  KEYS: loc
  ARGV: block keys...
  reply: one "entry[,entry...]" string (base-36 incarnations) or false per key
]]
redis.register_function{function_name = 'kvpool_lookup', flags = {'no-writes'},
  callback = function(keys, argv)
    if #argv == 0 then return {} end
    return rcall('HMGET', keys[1], unpack(argv))
  end}

--[[
kvpool_gc: drops entries of incarnations that are not live, one HSCAN page per call. Never
touches the INDEX_SENTINEL field.
  KEYS: loc
  ARGV: cursor, count, then the live entries (base-36 incarnations); an argument ">N" (N decimal)
        instead keeps every incarnation greater than N (nodes that joined after the caller read
        the members)
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
    if fields[i] ~= INDEX_SENTINEL then
      local kept = {}
      local entries = split(fields[i + 1], ',')
      for _, e in ipairs(entries) do
        if live[e] or (tonumber(e, 36) or 0) > newer_than then kept[#kept + 1] = e end
      end
      if #kept < #entries then
        removed = removed + #entries - #kept
        if #kept == 0 then rcall('HDEL', keys[1], fields[i]) else rcall('HSET', keys[1], fields[i], table.concat(kept, ',')) end
      end
    end
  end
  return {page[1], removed}
end)
