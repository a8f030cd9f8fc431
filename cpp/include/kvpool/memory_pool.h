// The storage node's memory: one region mapped at start, carved by a segregated-fit allocator.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kvpool/status.h"

namespace kvpool {

/// Whether the pool should be backed by explicit hugepages (MAP_HUGETLB).
enum class HugePages { kAuto, kOn, kOff };

/// "auto", "on" or "off"; InvalidArgument naming the value otherwise.
Result<HugePages> ParseHugePages(const std::string& name);
const char* HugePagesName(HugePages huge);

/// One contiguous, page-aligned region allocated once (hugepages when available) and handed out in
/// granules of kGranule bytes. Allocation uses size classes (8 sub-classes per power of two, so a
/// request is served from a free run at most 12.5% larger than the smallest one that fits, then
/// split); freeing coalesces neighbours. All bookkeeping lives in arrays sized at construction:
/// Allocate and Free never call malloc and run in O(1).
///
/// Not thread-safe: the owner (BlockStore) serialises calls.
class MemoryPool {
 public:
  static constexpr size_t kGranule = 4096;

  /// Maps `capacity` bytes (rounded up to kGranule). Errors: InvalidArgument for a zero or
  /// oversized capacity; NoSpace when the mapping fails (or hugepages are kOn and unavailable).
  static Result<std::unique_ptr<MemoryPool>> Create(size_t capacity,
                                                    HugePages huge = HugePages::kAuto);
  /// An allocator over `capacity` bytes of memory the caller mapped and keeps mapped for the
  /// pool's lifetime (the client's staging arena); the pool never unmaps it.
  static Result<std::unique_ptr<MemoryPool>> Over(uint8_t* base, size_t capacity);
  ~MemoryPool();
  MemoryPool(const MemoryPool&) = delete;
  MemoryPool& operator=(const MemoryPool&) = delete;

  /// Offset of a run of at least `size` bytes (rounded up to granules), or -1 when no free run
  /// fits.
  int64_t Allocate(size_t size);
  /// Returns the run at `offset` (as returned by Allocate) to the pool.
  void Free(int64_t offset);
  /// Bytes of the run at `offset` (a multiple of kGranule).
  size_t RunBytes(int64_t offset) const;

  uint8_t* base() const { return base_; }
  size_t capacity() const { return granules_ * kGranule; }
  size_t used_bytes() const { return used_granules_ * kGranule; }
  /// Largest run currently free (bytes); 0 when full.
  size_t largest_free_bytes() const;
  bool hugepages() const { return hugepages_; }

 private:
  MemoryPool(uint8_t* base, size_t granules, bool hugepages, size_t mapped_bytes);
  static constexpr int kSubBits = 3;
  static constexpr int kClasses = 64 << kSubBits;

  static int ClassFloor(uint64_t granules);    // class whose every run is >= its lower bound
  static int ClassCeil(uint64_t granules);     // first class whose runs all hold `granules`
  void Link(uint32_t start, uint32_t length);  // add a free run to its class list
  void Unlink(uint32_t start);                 // remove a free run from its class list
  void MarkRun(uint32_t start, uint32_t length, bool free);

  uint8_t* base_;
  size_t granules_;
  bool hugepages_;
  size_t mapped_bytes_;  // 0: memory owned by the caller
  size_t used_granules_ = 0;
  // Per-granule boundary tags: the length of the run starting (head) or ending (tail) here.
  std::vector<uint32_t> head_len_, tail_len_;
  std::vector<uint8_t> head_free_;
  std::vector<uint32_t> next_, prev_;  // free-list links, valid at the head of free runs
  std::vector<uint32_t> class_head_;
  std::vector<uint64_t> class_bitmap_;
};

}  // namespace kvpool
