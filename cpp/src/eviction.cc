#include "kvpool/eviction.h"

#include <limits>
#include <vector>

namespace kvpool {
namespace {

constexpr uint32_t kNil = std::numeric_limits<uint32_t>::max();

/// Doubly linked queues threaded through per-entry arrays shared by all queues of one policy.
class Queues {
 public:
  Queues(size_t max_entries, int queues)
      : next_(max_entries, kNil),
        prev_(max_entries, kNil),
        where_(max_entries, -1),
        bytes_of_(max_entries, 0),
        head_(queues, kNil),
        tail_(queues, kNil),
        bytes_(queues, 0),
        count_(queues, 0) {}

  void PushBack(int q, uint32_t e, size_t bytes) {
    where_[e] = static_cast<int8_t>(q);
    bytes_of_[e] = bytes;
    prev_[e] = tail_[q];
    next_[e] = kNil;
    if (tail_[q] != kNil)
      next_[tail_[q]] = e;
    else
      head_[q] = e;
    tail_[q] = e;
    bytes_[q] += bytes;
    ++count_[q];
  }
  void Remove(uint32_t e) {
    const int q = where_[e];
    if (q < 0) return;
    if (prev_[e] != kNil)
      next_[prev_[e]] = next_[e];
    else
      head_[q] = next_[e];
    if (next_[e] != kNil)
      prev_[next_[e]] = prev_[e];
    else
      tail_[q] = prev_[e];
    bytes_[q] -= bytes_of_[e];
    --count_[q];
    where_[e] = -1;
  }
  void MoveBack(int q, uint32_t e) {
    const size_t bytes = bytes_of_[e];
    Remove(e);
    PushBack(q, e, bytes);
  }
  uint32_t Front(int q) const { return head_[q]; }
  size_t Bytes(int q) const { return bytes_[q]; }
  size_t Count(int q) const { return count_[q]; }

 private:
  std::vector<uint32_t> next_, prev_;
  std::vector<int8_t> where_;
  std::vector<size_t> bytes_of_;
  std::vector<uint32_t> head_, tail_;
  std::vector<size_t> bytes_, count_;
};

class LruPolicy final : public EvictionPolicy {
 public:
  explicit LruPolicy(size_t max_entries) : q_(max_entries, 1) {}
  void OnInsert(uint32_t e, uint64_t, size_t bytes) override { q_.PushBack(0, e, bytes); }
  void OnAccess(uint32_t e) override { q_.MoveBack(0, e); }
  void OnRemove(uint32_t e) override { q_.Remove(e); }
  int64_t PickVictim(const std::function<bool(uint32_t)>& evictable) override {
    for (size_t n = q_.Count(0); n > 0; --n) {
      const uint32_t e = q_.Front(0);
      if (evictable(e)) {
        q_.Remove(e);
        return e;
      }
      q_.MoveBack(0, e);  // in use: treat as recently used
    }
    return -1;
  }

 private:
  Queues q_;
};

/// S3-FIFO (Yang et al., SOSP'23): new blocks enter a small FIFO; blocks read again while there are
/// promoted to the main FIFO, the rest leave early and are remembered in a ghost table, so a key
/// that comes back soon is admitted straight to main. Good for KV caches, where most prefixes are
/// seen once and a few (system prompts) are read constantly.
class S3FifoPolicy final : public EvictionPolicy {
 public:
  explicit S3FifoPolicy(size_t max_entries)
      : q_(max_entries, 2),
        freq_(max_entries, 0),
        fingerprint_(max_entries, 0),
        ghost_(GhostSlots(max_entries), 0) {}

  void OnInsert(uint32_t e, uint64_t fp, size_t bytes) override {
    fingerprint_[e] = fp;
    freq_[e] = 0;
    uint64_t& slot = ghost_[fp & (ghost_.size() - 1)];
    if (slot == fp) {
      slot = 0;
      q_.PushBack(kMain, e, bytes);
    } else {
      q_.PushBack(kSmall, e, bytes);
    }
  }
  void OnAccess(uint32_t e) override {
    if (freq_[e] < 3) ++freq_[e];
  }
  void OnRemove(uint32_t e) override { q_.Remove(e); }

  int64_t PickVictim(const std::function<bool(uint32_t)>& evictable) override {
    // Each step either evicts or moves one entry; two passes over everything means all are pinned
    // or hot and frequency counters have been drained.
    for (size_t budget = 4 * (q_.Count(kSmall) + q_.Count(kMain)) + 1; budget > 0; --budget) {
      const size_t total = q_.Bytes(kSmall) + q_.Bytes(kMain);
      const bool from_small =
          q_.Count(kSmall) > 0 && (q_.Bytes(kSmall) * 10 >= total || q_.Count(kMain) == 0);
      if (from_small) {
        const uint32_t e = q_.Front(kSmall);
        if (freq_[e] > 0 || !evictable(e)) {
          freq_[e] = 0;
          q_.MoveBack(kMain, e);
          continue;
        }
        q_.Remove(e);
        ghost_[fingerprint_[e] & (ghost_.size() - 1)] = fingerprint_[e];
        return e;
      }
      if (q_.Count(kMain) == 0) return -1;
      const uint32_t e = q_.Front(kMain);
      if (freq_[e] > 0 || !evictable(e)) {
        if (freq_[e] > 0) --freq_[e];
        q_.MoveBack(kMain, e);
        continue;
      }
      q_.Remove(e);
      return e;
    }
    return -1;
  }

 private:
  static constexpr int kSmall = 0, kMain = 1;
  static size_t GhostSlots(size_t max_entries) {
    size_t n = 1024;
    while (n < max_entries) n <<= 1;
    return n;
  }
  Queues q_;
  std::vector<uint8_t> freq_;
  std::vector<uint64_t> fingerprint_;
  // Direct-mapped ghost table of recently evicted fingerprints; a collision only forgets a ghost.
  std::vector<uint64_t> ghost_;
};

}  // namespace

Result<EvictionKind> ParseEvictionKind(const std::string& name) {
  if (name == "s3fifo" || name == "s3-fifo") return EvictionKind::kS3Fifo;
  if (name == "lru") return EvictionKind::kLru;
  return Status(ErrorCode::kInvalidArgument,
                "unknown eviction policy '" + name + "' (expected 's3fifo' or 'lru')");
}

const char* EvictionKindName(EvictionKind kind) {
  return kind == EvictionKind::kLru ? "lru" : "s3fifo";
}

std::unique_ptr<EvictionPolicy> EvictionPolicy::Create(EvictionKind kind, size_t max_entries) {
  if (kind == EvictionKind::kLru) return std::make_unique<LruPolicy>(max_entries);
  return std::make_unique<S3FifoPolicy>(max_entries);
}

}  // namespace kvpool
