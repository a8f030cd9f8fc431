// Eviction policies: which committed block to drop when the store needs room.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "kvpool/status.h"

namespace kvpool {

enum class EvictionKind { kS3Fifo, kLru };

/// "s3fifo" / "lru" -> kind; InvalidArgument naming the value otherwise.
Result<EvictionKind> ParseEvictionKind(const std::string& name);
const char* EvictionKindName(EvictionKind kind);

/// Tracks entries by index (0 <= entry < max_entries) in intrusive queues sized at construction: no
/// allocation after that. The owner serialises calls.
class EvictionPolicy {
 public:
  virtual ~EvictionPolicy() = default;
  /// A committed entry of `bytes` bytes whose key hashes to `fingerprint`.
  virtual void OnInsert(uint32_t entry, uint64_t fingerprint, size_t bytes) = 0;
  /// The entry was read.
  virtual void OnAccess(uint32_t entry) = 0;
  /// The entry left the store for another reason than PickVictim (delete).
  virtual void OnRemove(uint32_t entry) = 0;
  /// Removes and returns the next victim among entries for which `evictable` is true, or -1 when
  /// a full pass found none.
  virtual int64_t PickVictim(const std::function<bool(uint32_t)>& evictable) = 0;

  static std::unique_ptr<EvictionPolicy> Create(EvictionKind kind, size_t max_entries);
};

}  // namespace kvpool
