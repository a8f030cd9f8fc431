// The latency-critical read of the block-location index: one pipelined round trip to Redis.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "kvpool/hashing.h"
#include "kvpool/status.h"

namespace kvpool {

/// Where the cluster's Redis is (plain TCP; TLS endpoints use redis-py instead).
struct RedisEndpoint {
  std::string host = "127.0.0.1";
  uint16_t port = 6379;
  std::string username;  ///< ACL user; empty = default user
  std::string password;  ///< empty = no AUTH
  int db = 0;
};

/// Reads the block-location index the `kvpool` Functions library maintains: for a batch of keys
/// it sends, in one pipeline, the epoch read and one HMGET per index partition the keys fall in
/// (what kvpool_epoch and kvpool_lookup return, without a Lua call per partition), and parses
/// the replies without any per-key allocation beyond the holder strings. Thread-safe (calls
/// serialise on one connection); a broken connection is re-opened by the next call.
class RedisIndexReader {
 public:
  /// `partition_keys[p]` is the Redis key of partition p (`kvpool:{C/p}:loc`); `meta_key` the
  /// cluster's meta hash. The key's partition is its first two bytes (big-endian) modulo the
  /// number of partitions.
  RedisIndexReader(RedisEndpoint endpoint, std::string meta_key,
                   std::vector<std::string> partition_keys, uint32_t timeout_ms);
  ~RedisIndexReader();

  /// Fills `epoch` and, per key, its holders as published: comma-separated entries, each a node's
  /// incarnation in base 36 (see redis_scripts/00_common.lua), or empty.
  /// Errors: Connection/Timeout/Closed for the network, Protocol for a reply it cannot parse,
  /// Internal with Redis's message for an error reply (e.g. the library is not loaded).
  Status Lookup(std::span<const Key128> keys, int64_t* epoch, std::vector<std::string>* holders);

  /// Like Lookup, but maps each key to the index in `live` (the base-36 incarnation entries of
  /// the caller's member view) of its first published holder that is live, or -1. Entries of dead
  /// incarnations are thereby never returned.
  Status Locate(std::span<const Key128> keys, std::span<const std::string> live, int64_t* epoch,
                std::vector<int32_t>* holder);

 private:
  class Conn;
  Status EnsureConnected();

  RedisEndpoint endpoint_;
  std::string meta_key_;
  std::vector<std::string> partition_keys_;
  uint32_t timeout_ms_;
  std::mutex mu_;
  std::unique_ptr<Conn> conn_;
  // Reused per call.
  std::vector<std::vector<uint32_t>> by_partition_;
  std::string request_;
};

}  // namespace kvpool
