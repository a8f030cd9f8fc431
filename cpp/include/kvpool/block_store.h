// The storage node's index: key -> committed block in the memory pool, with eviction and pins.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "kvpool/eviction.h"
#include "kvpool/hashing.h"
#include "kvpool/memory_pool.h"
#include "kvpool/status.h"

namespace kvpool {

struct BlockStoreOptions {
  size_t capacity = size_t{1} << 30;  ///< Pool bytes.
  HugePages hugepages = HugePages::kAuto;
  EvictionKind eviction = EvictionKind::kS3Fifo;
  /// Reservations evict committed blocks so that allocated bytes stay <= this fraction of capacity.
  double high_watermark = 0.95;
  /// Capacity of the commit/removal event ring drained by the metadata publisher; 0 = no events.
  size_t event_capacity = 0;
};

/// A change of the set of committed keys, for the block-location index.
struct BlockEvent {
  Key128 key;
  bool added = false;  ///< committed (true) or evicted/deleted (false)
};

/// Outcome of reserving room for one block.
enum class PutResult : uint8_t {
  kReserved = 0,  ///< Room reserved: fill it, then Commit or Abort.
  kExists = 1,    ///< The key is already committed; nothing to write (blocks are immutable).
  kNoSpace = 2,   ///< Even after eviction there is no room (everything else is pinned or reserved).
  kTooLarge = 3,  ///< The block is larger than the store could ever hold under its watermark.
};

/// Room for one block between Reserve and Commit/Abort. Invisible to readers.
struct Reservation {
  int64_t offset = -1;
  size_t size = 0;
  uint8_t* data = nullptr;
};

/// A committed block held against eviction until Unpin.
struct PinnedBlock {
  uint32_t entry = 0;
  const uint8_t* data = nullptr;
  size_t size = 0;
};

struct BlockStoreStats {
  uint64_t capacity_bytes = 0, used_bytes = 0, high_watermark_bytes = 0;
  uint64_t entries = 0, reserved_blocks = 0, pinned_blocks = 0;
  uint64_t reserved_bytes = 0, pinned_bytes = 0;  ///< bytes of the blocks counted beside
  uint64_t hits = 0, misses = 0, stored = 0, existing = 0, rejected = 0, evictions = 0, deletes = 0;
  uint64_t bytes_in = 0, bytes_out = 0;
};

/// Blocks are written reserve -> fill -> commit: only committed blocks are visible, and a block is
/// immutable once committed (committing a key that exists frees the new copy and keeps the old).
/// Readers pin blocks; eviction and deletion never free memory under a pin. Thread-safe: metadata
/// operations take one lock per batch; filling and reading block bytes happen outside it.
class BlockStore {
 public:
  static Result<std::unique_ptr<BlockStore>> Create(const BlockStoreOptions& options);

  /// For each key, reserves `sizes[i]` bytes or says why not. `out[i]` is filled for kReserved.
  void Reserve(std::span<const Key128> keys, std::span<const uint64_t> sizes,
               std::span<PutResult> results, std::span<Reservation> out);
  /// Publishes filled reservations. Returns per key true when stored, false when the key was
  /// committed meanwhile by another writer (the reservation is then freed).
  void Commit(std::span<const Key128> keys, std::span<const Reservation> reservations,
              std::span<bool> stored);
  /// Frees reservations that will never be committed (the writer went away).
  void Abort(std::span<const Reservation> reservations);

  /// Pins the committed blocks among `keys`; found[i] says whether out[i] is valid. Counts hits.
  void Pin(std::span<const Key128> keys, std::span<PinnedBlock> out, std::span<bool> found);
  void Unpin(std::span<const PinnedBlock> blocks);

  void Contains(std::span<const Key128> keys, std::span<bool> present) const;
  /// Number of leading keys that are committed.
  size_t MatchPrefix(std::span<const Key128> keys) const;
  /// Removes keys; deleted[i] says whether it was present. Pinned blocks are freed at last Unpin.
  void Delete(std::span<const Key128> keys, std::span<bool> deleted);

  /// Moves up to `max` pending events (oldest first) into `out`. When the ring overflowed since
  /// the last drain, the oldest events were dropped and `*dropped` says how many.
  void DrainEvents(size_t max, std::vector<BlockEvent>* out, uint64_t* dropped);

  /// Appends every committed key (for a full re-publication of the location index).
  void SnapshotKeys(std::vector<Key128>* out) const;

  BlockStoreStats Stats() const;
  const MemoryPool& pool() const { return *pool_; }

 private:
  enum class EntryState : uint8_t { kFree, kLive, kDoomed };
  struct Entry {
    Key128 key;
    int64_t offset = -1;
    uint64_t size = 0;
    uint32_t pins = 0;
    EntryState state = EntryState::kFree;
  };

  BlockStore(const BlockStoreOptions& options, std::unique_ptr<MemoryPool> pool);
  int64_t FindLocked(const Key128& key) const;  // entry index or -1
  void InsertLocked(uint32_t entry);
  void EraseLocked(const Key128& key);
  void ReleaseEntryLocked(uint32_t entry);  // frees memory and the entry slot
  bool EvictOneLocked();
  int64_t AllocateLocked(size_t size);
  void RecordLocked(const Key128& key, bool added);

  BlockStoreOptions options_;
  std::unique_ptr<MemoryPool> pool_;
  std::unique_ptr<EvictionPolicy> policy_;
  size_t high_watermark_bytes_;
  mutable std::mutex mu_;
  std::vector<Entry> entries_;
  std::vector<uint32_t> free_entries_;
  std::vector<uint32_t> slots_;  // open addressing, linear probing; kEmptySlot or entry index
  size_t slot_mask_;
  mutable BlockStoreStats stats_;
  // Fixed-size ring of events; allocated once, so recording never allocates.
  std::vector<BlockEvent> events_;
  size_t event_head_ = 0, event_count_ = 0;
  uint64_t events_dropped_ = 0;
};

}  // namespace kvpool
