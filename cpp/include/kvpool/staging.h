// The client's staging memory: one arena mapped once from a sealed memfd (so a same-host node can
// map it too), carved by the node pool's segregated-fit allocator, and shared by every connection
// of every client that uses it. Buffers inside it travel as (offset, length) on shared memory:
// the node copies straight between them and its pool.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>

#include "kvpool/buffer.h"
#include "kvpool/status.h"

namespace kvpool {

class MemoryPool;

class StagingArena {
 public:
  /// Maps `bytes` (rounded up to 2 MiB) of a memfd sealed against shrinking and growing. Pages
  /// are faulted in on first touch. InvalidArgument for 0 bytes, NoSpace when the memfd or the
  /// mapping cannot be made.
  static Result<std::shared_ptr<StagingArena>> Create(size_t bytes);
  ~StagingArena();
  StagingArena(const StagingArena&) = delete;
  StagingArena& operator=(const StagingArena&) = delete;

  /// A buffer of exactly `bytes` (its run is rounded up to 4 KiB), or {nullptr, 0} when the
  /// arena has no room (the caller falls back to its own memory: never blocks). Thread-safe.
  MutableBuffer Take(size_t bytes);
  /// Returns a buffer from Take. Only once no node can still be writing into it.
  void Give(const uint8_t* data);

  /// Offset of [p, p + n) in the arena, or nullopt when that range is not wholly inside it.
  std::optional<uint64_t> Offset(const void* p, size_t n) const {
    const auto a = reinterpret_cast<uintptr_t>(p), b = reinterpret_cast<uintptr_t>(base_);
    if (a < b || n > bytes_ || a - b > bytes_ - n) return std::nullopt;
    return a - b;
  }
  int fd() const { return fd_; }
  uint8_t* base() const { return base_; }
  size_t size() const { return bytes_; }
  size_t used_bytes() const;

 private:
  StagingArena(int fd, uint8_t* base, size_t bytes, std::unique_ptr<MemoryPool> pool);
  int fd_;
  uint8_t* base_;
  size_t bytes_;
  mutable std::mutex mu_;
  std::unique_ptr<MemoryPool> pool_;
};

}  // namespace kvpool
