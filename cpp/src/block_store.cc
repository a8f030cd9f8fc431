#include "kvpool/block_store.h"

#include <algorithm>
#include <limits>

#include "support/log.h"

namespace kvpool {
namespace {

constexpr uint32_t kEmptySlot = std::numeric_limits<uint32_t>::max();

}  // namespace

Result<std::unique_ptr<BlockStore>> BlockStore::Create(const BlockStoreOptions& options) {
  if (!(options.high_watermark > 0.0 && options.high_watermark <= 1.0)) {
    return Status(ErrorCode::kInvalidArgument,
                  "high_watermark " + std::to_string(options.high_watermark) + " is not in (0, 1]");
  }
  auto pool = MemoryPool::Create(options.capacity, options.hugepages);
  if (!pool.ok()) return pool.status();
  return std::unique_ptr<BlockStore>(new BlockStore(options, std::move(pool.value())));
}

BlockStore::BlockStore(const BlockStoreOptions& options, std::unique_ptr<MemoryPool> pool)
    : options_(options), pool_(std::move(pool)) {
  // Every block takes at least one granule, so this many entries can never run out.
  const size_t max_entries = pool_->capacity() / MemoryPool::kGranule;
  policy_ = EvictionPolicy::Create(options.eviction, max_entries);
  high_watermark_bytes_ =
      static_cast<size_t>(options.high_watermark * static_cast<double>(pool_->capacity()));
  entries_.resize(max_entries);
  free_entries_.reserve(max_entries);
  for (size_t i = max_entries; i > 0; --i) free_entries_.push_back(static_cast<uint32_t>(i - 1));
  size_t slots = 16;
  while (slots < 2 * max_entries) slots <<= 1;
  slots_.assign(slots, kEmptySlot);
  slot_mask_ = slots - 1;
  events_.resize(options.event_capacity);
  stats_.capacity_bytes = pool_->capacity();
  stats_.high_watermark_bytes = high_watermark_bytes_;
}

int64_t BlockStore::FindLocked(const Key128& key) const {
  for (size_t i = key.Low64() & slot_mask_;; i = (i + 1) & slot_mask_) {
    const uint32_t e = slots_[i];
    if (e == kEmptySlot) return -1;
    if (entries_[e].key == key) return e;
  }
}

void BlockStore::InsertLocked(uint32_t entry) {
  size_t i = entries_[entry].key.Low64() & slot_mask_;
  while (slots_[i] != kEmptySlot) i = (i + 1) & slot_mask_;
  slots_[i] = entry;
}

void BlockStore::EraseLocked(const Key128& key) {
  size_t i = key.Low64() & slot_mask_;
  while (slots_[i] != kEmptySlot && entries_[slots_[i]].key != key) i = (i + 1) & slot_mask_;
  if (slots_[i] == kEmptySlot) return;
  // Backward-shift deletion keeps probe chains intact without tombstones.
  size_t hole = i;
  for (size_t j = (i + 1) & slot_mask_; slots_[j] != kEmptySlot; j = (j + 1) & slot_mask_) {
    const size_t home = entries_[slots_[j]].key.Low64() & slot_mask_;
    // Move slots_[j] into the hole unless its home lies cyclically in (hole, j].
    const bool home_after_hole =
        hole <= j ? (home > hole && home <= j) : (home > hole || home <= j);
    if (!home_after_hole) {
      slots_[hole] = slots_[j];
      hole = j;
    }
  }
  slots_[hole] = kEmptySlot;
}

void BlockStore::ReleaseEntryLocked(uint32_t entry) {
  Entry& e = entries_[entry];
  pool_->Free(e.offset);
  e = Entry{};
  free_entries_.push_back(entry);
}

void BlockStore::RecordLocked(const Key128& key, bool added) {
  if (events_.empty()) return;
  if (event_count_ == events_.size()) {
    event_head_ = (event_head_ + 1) % events_.size();  // drop the oldest
    --event_count_;
    ++events_dropped_;
  }
  events_[(event_head_ + event_count_) % events_.size()] = BlockEvent{key, added};
  ++event_count_;
}

void BlockStore::DrainEvents(size_t max, std::vector<BlockEvent>* out, uint64_t* dropped) {
  std::lock_guard<std::mutex> lock(mu_);
  const size_t n = std::min(max, event_count_);
  for (size_t i = 0; i < n; ++i) out->push_back(events_[(event_head_ + i) % events_.size()]);
  if (n > 0) event_head_ = (event_head_ + n) % events_.size();
  event_count_ -= n;
  *dropped = events_dropped_;
  events_dropped_ = 0;
}

bool BlockStore::EvictOneLocked() {
  const int64_t victim = policy_->PickVictim([this](uint32_t e) { return entries_[e].pins == 0; });
  if (victim < 0) return false;
  const auto v = static_cast<uint32_t>(victim);
  RecordLocked(entries_[v].key, false);
  EraseLocked(entries_[v].key);
  ReleaseEntryLocked(v);
  ++stats_.evictions;
  --stats_.entries;
  return true;
}

int64_t BlockStore::AllocateLocked(size_t size) {
  // What the pool will take: whole granules, and one for an empty block (MemoryPool::Allocate
  // gives every block a run), or empty blocks would each push usage a granule over the mark.
  const size_t granules =
      std::max<size_t>(1, (size + MemoryPool::kGranule - 1) / MemoryPool::kGranule);
  const size_t rounded = granules * MemoryPool::kGranule;
  while (true) {
    if (pool_->used_bytes() + rounded <= high_watermark_bytes_) {
      const int64_t offset = pool_->Allocate(size);
      if (offset >= 0) return offset;
    }
    if (!EvictOneLocked()) return -1;
  }
}

void BlockStore::Reserve(std::span<const Key128> keys, std::span<const uint64_t> sizes,
                         std::span<PutResult> results, std::span<Reservation> out) {
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < keys.size(); ++i) {
    out[i] = Reservation{};
    if (FindLocked(keys[i]) >= 0) {
      results[i] = PutResult::kExists;
      ++stats_.existing;
      continue;
    }
    // Compare what the block would occupy (whole granules), or a block just under the watermark
    // could evict everything and still not fit.
    const uint64_t granules =
        sizes[i] / MemoryPool::kGranule + (sizes[i] % MemoryPool::kGranule != 0);
    if (granules > high_watermark_bytes_ / MemoryPool::kGranule) {
      results[i] = PutResult::kTooLarge;
      ++stats_.rejected;
      continue;
    }
    const int64_t offset = AllocateLocked(sizes[i]);
    if (offset < 0) {
      results[i] = PutResult::kNoSpace;
      ++stats_.rejected;
      continue;
    }
    results[i] = PutResult::kReserved;
    out[i] = Reservation{offset, sizes[i], pool_->base() + offset};
    ++stats_.reserved_blocks;
    stats_.reserved_bytes += sizes[i];
  }
}

void BlockStore::Commit(std::span<const Key128> keys, std::span<const Reservation> reservations,
                        std::span<bool> stored) {
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < keys.size(); ++i) {
    const Reservation& r = reservations[i];
    --stats_.reserved_blocks;
    stats_.reserved_bytes -= r.size;
    if (FindLocked(keys[i]) >= 0) {
      // Another writer won the race; blocks are immutable, so keep the first.
      pool_->Free(r.offset);
      stored[i] = false;
      ++stats_.existing;
      continue;
    }
    const uint32_t e = free_entries_.back();
    free_entries_.pop_back();
    entries_[e] = Entry{keys[i], r.offset, r.size, 0, EntryState::kLive};
    InsertLocked(e);
    RecordLocked(keys[i], true);
    policy_->OnInsert(e, keys[i].Low64(), pool_->RunBytes(r.offset));
    stored[i] = true;
    ++stats_.stored;
    ++stats_.entries;
    stats_.bytes_in += r.size;
  }
}

void BlockStore::Abort(std::span<const Reservation> reservations) {
  std::lock_guard<std::mutex> lock(mu_);
  for (const Reservation& r : reservations) {
    pool_->Free(r.offset);
    --stats_.reserved_blocks;
    stats_.reserved_bytes -= r.size;
  }
}

void BlockStore::Pin(std::span<const Key128> keys, std::span<PinnedBlock> out,
                     std::span<bool> found) {
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < keys.size(); ++i) {
    const int64_t e = FindLocked(keys[i]);
    found[i] = e >= 0;
    if (e < 0) {
      ++stats_.misses;
      continue;
    }
    Entry& entry = entries_[e];
    if (entry.pins++ == 0) {
      ++stats_.pinned_blocks;
      stats_.pinned_bytes += entry.size;
    }
    policy_->OnAccess(static_cast<uint32_t>(e));
    out[i] = PinnedBlock{static_cast<uint32_t>(e), pool_->base() + entry.offset, entry.size};
    ++stats_.hits;
    stats_.bytes_out += entry.size;
  }
}

void BlockStore::Unpin(std::span<const PinnedBlock> blocks) {
  std::lock_guard<std::mutex> lock(mu_);
  for (const PinnedBlock& b : blocks) {
    Entry& entry = entries_[b.entry];
    if (--entry.pins > 0) continue;
    --stats_.pinned_blocks;
    stats_.pinned_bytes -= entry.size;
    if (entry.state == EntryState::kDoomed) ReleaseEntryLocked(b.entry);
  }
}

void BlockStore::Contains(std::span<const Key128> keys, std::span<bool> present) const {
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < keys.size(); ++i) present[i] = FindLocked(keys[i]) >= 0;
}

size_t BlockStore::MatchPrefix(std::span<const Key128> keys) const {
  std::lock_guard<std::mutex> lock(mu_);
  size_t n = 0;
  while (n < keys.size() && FindLocked(keys[n]) >= 0) ++n;
  return n;
}

void BlockStore::Delete(std::span<const Key128> keys, std::span<bool> deleted) {
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < keys.size(); ++i) {
    const int64_t found = FindLocked(keys[i]);
    deleted[i] = found >= 0;
    if (found < 0) continue;
    const auto e = static_cast<uint32_t>(found);
    EraseLocked(keys[i]);
    RecordLocked(keys[i], false);
    policy_->OnRemove(e);
    --stats_.entries;
    ++stats_.deletes;
    if (entries_[e].pins > 0) {
      entries_[e].state = EntryState::kDoomed;  // freed by the last Unpin
    } else {
      ReleaseEntryLocked(e);
    }
  }
}

void BlockStore::SnapshotKeys(std::vector<Key128>* out) const {
  std::lock_guard<std::mutex> lock(mu_);
  out->reserve(out->size() + stats_.entries);
  for (const uint32_t e : slots_) {
    if (e != kEmptySlot) out->push_back(entries_[e].key);
  }
}

BlockStoreStats BlockStore::Stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  BlockStoreStats s = stats_;
  s.used_bytes = pool_->used_bytes();
  return s;
}

}  // namespace kvpool
