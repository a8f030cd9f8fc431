#include "kvpool/memory_pool.h"

#include <sys/mman.h>

#include <bit>
#include <limits>
#include <memory>

#include "support/log.h"

namespace kvpool {
namespace {

constexpr uint32_t kNil = std::numeric_limits<uint32_t>::max();
constexpr size_t kHugePage = size_t{2} << 20;
constexpr int kMadvPopulateWrite = 23;  // MADV_POPULATE_WRITE (Linux 5.14); older kernels: EINVAL

uint64_t ClassLowerBound(int c) {
  if (c < 16) return static_cast<uint64_t>(c);
  const int msb = c / 8 + 2;
  return static_cast<uint64_t>(8 + c % 8) << (msb - 3);
}

}  // namespace

Result<HugePages> ParseHugePages(const std::string& name) {
  if (name == "auto") return HugePages::kAuto;
  if (name == "on") return HugePages::kOn;
  if (name == "off") return HugePages::kOff;
  return Status(ErrorCode::kInvalidArgument,
                "hugepages must be 'auto', 'on' or 'off', got '" + name + "'");
}

const char* HugePagesName(HugePages huge) {
  return huge == HugePages::kOn ? "on" : huge == HugePages::kOff ? "off" : "auto";
}

Result<std::unique_ptr<MemoryPool>> MemoryPool::Create(size_t capacity, HugePages huge) {
  if (capacity == 0) return Status(ErrorCode::kInvalidArgument, "pool capacity must be > 0");
  const size_t granules = (capacity + kGranule - 1) / kGranule;
  if (granules >= kNil) {
    return Status(ErrorCode::kInvalidArgument,
                  "pool capacity " + std::to_string(capacity) + " exceeds 16 TiB");
  }
  const size_t bytes = granules * kGranule;
  // A cache node owns its memory from the start: pages are faulted in here, not on the data path.
  // No MAP_NORESERVE: hugetlb pages must be reserved at map time, or the first touch faults.
  const int base_flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE;
  void* p = MAP_FAILED;
  size_t mapped = bytes;
  bool got_huge = false;
  if (huge != HugePages::kOff) {
    mapped = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    p = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, base_flags | MAP_HUGETLB, -1, 0);
    got_huge = p != MAP_FAILED;
    if (!got_huge && huge == HugePages::kOn) {
      return Status(ErrorCode::kNoSpace, "hugepages requested but " + std::to_string(mapped) +
                                             " bytes of hugepages could not be mapped " +
                                             "(check /proc/sys/vm/nr_hugepages)");
    }
  }
  if (!got_huge) {
    mapped = bytes;
    p = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      return Status(ErrorCode::kNoSpace,
                    "could not map a pool of " + std::to_string(bytes) + " bytes");
    }
    // Ask for transparent hugepages before the first touch (fewer TLB misses on large copies),
    // then fault everything in now rather than on the data path.
    madvise(p, mapped, MADV_HUGEPAGE);
    if (madvise(p, mapped, kMadvPopulateWrite) != 0) {
      for (size_t off = 0; off < mapped; off += kGranule)
        static_cast<volatile uint8_t*>(p)[off] = 0;
    }
  }
  KVPOOL_LOG(kInfo, "memory pool mapped", "bytes", bytes, "hugepages", got_huge);
  return std::unique_ptr<MemoryPool>(
      new MemoryPool(static_cast<uint8_t*>(p), granules, got_huge, mapped));
}

MemoryPool::MemoryPool(uint8_t* base, size_t granules, bool hugepages, size_t mapped_bytes)
    : base_(base),
      granules_(granules),
      hugepages_(hugepages),
      mapped_bytes_(mapped_bytes),
      head_len_(granules, 0),
      tail_len_(granules, 0),
      head_free_(granules, 0),
      next_(granules, kNil),
      prev_(granules, kNil),
      class_head_(kClasses, kNil),
      class_bitmap_(kClasses / 64, 0) {
  MarkRun(0, static_cast<uint32_t>(granules), true);
  Link(0, static_cast<uint32_t>(granules));
}

MemoryPool::~MemoryPool() {
  if (mapped_bytes_ != 0) munmap(base_, mapped_bytes_);
}

Result<std::unique_ptr<MemoryPool>> MemoryPool::Over(uint8_t* base, size_t capacity) {
  const size_t granules = capacity / kGranule;
  if (granules == 0 || granules >= kNil) {
    return Status(ErrorCode::kInvalidArgument,
                  "pool over " + std::to_string(capacity) + " bytes: needs 4 KiB to 16 TiB");
  }
  return std::unique_ptr<MemoryPool>(new MemoryPool(base, granules, false, 0));
}

int MemoryPool::ClassFloor(uint64_t n) {
  if (n < 16) return static_cast<int>(n);
  const int msb = 63 - std::countl_zero(n);
  return (msb - 2) * 8 + static_cast<int>((n >> (msb - 3)) & 7);
}

int MemoryPool::ClassCeil(uint64_t n) {
  const int c = ClassFloor(n);
  return ClassLowerBound(c) < n ? c + 1 : c;
}

void MemoryPool::MarkRun(uint32_t start, uint32_t length, bool free) {
  head_len_[start] = length;
  head_free_[start] = free ? 1 : 0;
  tail_len_[start + length - 1] = length;
}

void MemoryPool::Link(uint32_t start, uint32_t length) {
  const int c = ClassFloor(length);
  next_[start] = class_head_[c];
  prev_[start] = kNil;
  if (class_head_[c] != kNil) prev_[class_head_[c]] = start;
  class_head_[c] = start;
  class_bitmap_[c / 64] |= uint64_t{1} << (c % 64);
}

void MemoryPool::Unlink(uint32_t start) {
  const int c = ClassFloor(head_len_[start]);
  if (prev_[start] != kNil) {
    next_[prev_[start]] = next_[start];
  } else {
    class_head_[c] = next_[start];
    if (class_head_[c] == kNil) class_bitmap_[c / 64] &= ~(uint64_t{1} << (c % 64));
  }
  if (next_[start] != kNil) prev_[next_[start]] = prev_[start];
}

int64_t MemoryPool::Allocate(size_t size) {
  if (size == 0) size = 1;
  const uint64_t want = (size + kGranule - 1) / kGranule;
  if (want > granules_) return -1;
  uint32_t run = kNil;
  // Runs of exactly the requested size sit in the floor class; a short look there keeps uniform
  // block sizes (the common KV-cache case) from splitting larger runs.
  int c = ClassFloor(want);
  int probes = 0;
  for (uint32_t r = class_head_[c]; r != kNil && probes < 4; r = next_[r], ++probes) {
    if (head_len_[r] >= want) {
      run = r;
      break;
    }
  }
  if (run == kNil) {
    // Any run in a class at or above the ceiling class fits: take the first non-empty one.
    for (c = ClassCeil(want); c < kClasses; c = (c / 64 + 1) * 64) {
      const uint64_t bits = class_bitmap_[c / 64] & (~uint64_t{0} << (c % 64));
      if (bits != 0) {
        run = class_head_[(c / 64) * 64 + std::countr_zero(bits)];
        break;
      }
    }
    // Last resort: a fitting run may sit deeper in the floor class, behind smaller ones.
    for (uint32_t r = run == kNil ? class_head_[ClassFloor(want)] : kNil; r != kNil; r = next_[r]) {
      if (head_len_[r] >= want) {
        run = r;
        break;
      }
    }
    if (run == kNil) return -1;
  }
  const uint32_t length = head_len_[run];
  Unlink(run);
  const auto taken = static_cast<uint32_t>(want);
  MarkRun(run, taken, false);
  if (length > taken) {
    MarkRun(run + taken, length - taken, true);
    Link(run + taken, length - taken);
  }
  used_granules_ += taken;
  return static_cast<int64_t>(run) * static_cast<int64_t>(kGranule);
}

void MemoryPool::Free(int64_t offset) {
  auto start = static_cast<uint32_t>(offset / static_cast<int64_t>(kGranule));
  uint32_t length = head_len_[start];
  used_granules_ -= length;
  // Coalesce with the free neighbours on both sides.
  const uint32_t end = start + length;
  if (end < granules_ && head_free_[end]) {
    const uint32_t right = head_len_[end];
    Unlink(end);
    head_len_[end] = 0;
    head_free_[end] = 0;
    length += right;
  }
  if (start > 0) {
    const uint32_t left_len = tail_len_[start - 1];
    const uint32_t left = start - left_len;
    if (head_free_[left] && head_len_[left] == left_len) {
      Unlink(left);
      head_len_[start] = 0;
      head_free_[start] = 0;
      start = left;
      length += left_len;
    }
  }
  MarkRun(start, length, true);
  Link(start, length);
}

size_t MemoryPool::RunBytes(int64_t offset) const {
  return size_t{head_len_[static_cast<size_t>(offset) / kGranule]} * kGranule;
}

size_t MemoryPool::largest_free_bytes() const {
  for (int w = static_cast<int>(class_bitmap_.size()) - 1; w >= 0; --w) {
    if (class_bitmap_[w] == 0) continue;
    const int c = w * 64 + 63 - std::countl_zero(class_bitmap_[w]);
    uint32_t best = 0;
    for (uint32_t r = class_head_[c]; r != kNil; r = next_[r]) best = std::max(best, head_len_[r]);
    return size_t{best} * kGranule;
  }
  return 0;
}

}  // namespace kvpool
