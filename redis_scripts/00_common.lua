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
    kvpool:{C/p}:loc   hash   16-byte block key -> "entry[,entry...]", one entry per incarnation
                              that published the key: the incarnation in base 36, lowercase
                              (incarnations are unique in a cluster, so the member list maps an
                              entry to its node); plus the field "~" (INDEX_SENTINEL), see below
    kvpool:{C/p}:fence hash   node_id -> newest incarnation seen by this partition

Every loc hash holds the field "~" with a value longer than hash-max-listpack-value (64 bytes by
default), written by kvpool_fence (each node fences every partition right after it joins, before
it publishes). It keeps the hash in hashtable encoding: a small hash would otherwise be a listpack,
where HMGET scans linearly. Redis never converts a hashtable back to a listpack (and the long value
keeps it a hashtable when an RDB/AOF is loaded); the sentinel also keeps the hash from emptying.
It is never a block key (those are 16 bytes); kvpool_gc leaves it alone.

Domain errors are negative integer replies (kvpool.metadata.MetadataErrorCode mirrors them):
  -1 BAD_ARGS   malformed arguments
  -2 FENCED     the incarnation is older than the node's current one (superseded)
  -3 NOT_MEMBER the node is unknown or its lease expired (it must join again)
]]

-- redis.call is not reachable while the library loads, only when a function runs.
local function rcall(...) return redis.call(...) end

local LIBRARY_VERSION = 4
local E_BAD_ARGS, E_FENCED, E_NOT_MEMBER = -1, -2, -3

local function now_ms()
  local t = rcall('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local INDEX_SENTINEL = '~'
local INDEX_SENTINEL_VALUE = 'kvpool: keeps this hash in hashtable encoding (HMGET is a hash '
  .. 'lookup, not a listpack scan); not a block key, never remove it'

local B36 = '0123456789abcdefghijklmnopqrstuvwxyz'

-- An incarnation as the index names it: base 36, lowercase (n a non-negative integer < 2^53).
local function index_entry(n)
  if n == 0 then return '0' end
  local digits = {}
  while n > 0 do
    local d = n % 36
    digits[#digits + 1] = string.sub(B36, d + 1, d + 1)
    n = (n - d) / 36
  end
  return string.reverse(table.concat(digits))
end

-- A decimal incarnation argument as a number, or nil unless it is an integer in [0, 2^53).
local function incarnation_arg(s)
  local n = tonumber(s)
  if not n or n < 0 or n >= 9007199254740992 or n ~= math.floor(n) then return nil end
  return n
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
