#!lua name=kvpool
--[[
kvpool's Redis Functions library: cluster membership and the block-location index.

Loaded by kvpool.metadata.load_library() with FUNCTION LOAD REPLACE: the files of this folder in
name order, concatenated. kvpool_version() returns LIBRARY_VERSION; the loader replaces a library
whose version differs.

Keys (every key is passed in KEYS; nothing is built from ARGV):
  membership, one hash slot per cluster C ("{C}"):
    kvpool:{C}:meta    hash   epoch, next_incarnation
    kvpool:{C}:nodes   hash   node_id -> "incarnation|address|transports|capacity|joined_ms"
    kvpool:{C}:leases  zset   node_id -> lease expiry (ms, Redis server clock)
    kvpool:{C}:stats   hash   node_id -> "used_bytes|blocks|hits|misses|updated_ms"
  block-location index, P fixed partitions, each its own slot ("{C/p}"):
    kvpool:{C/p}:loc   hash   16-byte block key -> "node@incarnation[,node@incarnation...]"
    kvpool:{C/p}:fence hash   node_id -> newest incarnation seen by this partition

Domain errors are negative integer replies (kvpool.metadata.MetadataErrorCode mirrors them):
  -1 BAD_ARGS   malformed arguments
  -2 FENCED     the incarnation is older than the node's current one (superseded)
  -3 NOT_MEMBER the node is unknown or its lease expired (it must join again)
]]

-- redis.call is not reachable while the library loads, only when a function runs.
local function rcall(...) return redis.call(...) end

local LIBRARY_VERSION = 3
local E_BAD_ARGS, E_FENCED, E_NOT_MEMBER = -1, -2, -3

local function now_ms()
  local t = rcall('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function split(s, sep)
  local out = {}
  for part in string.gmatch(s, '([^' .. sep .. ']+)') do out[#out + 1] = part end
  return out
end

local function node_incarnation(nodes_key, node_id)
  local info = rcall('HGET', nodes_key, node_id)
  if not info then return nil end
  return tonumber(split(info, '|')[1])
end

-- Removes nodes whose lease expired; bumps the epoch when any left. Returns the removed ids.
local function reap(meta_key, nodes_key, leases_key, stats_key)
  local expired = rcall('ZRANGEBYSCORE', leases_key, '-inf', '(' .. now_ms())
  if #expired > 0 then
    rcall('ZREM', leases_key, unpack(expired))
    rcall('HDEL', nodes_key, unpack(expired))
    rcall('HDEL', stats_key, unpack(expired))
    rcall('HINCRBY', meta_key, 'epoch', 1)
  end
  return expired
end

local function epoch(meta_key)
  return tonumber(rcall('HGET', meta_key, 'epoch') or '0')
end
