// MemoryPool: the segregated-fit allocator behind the block store.
#include "kvpool/memory_pool.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <vector>

namespace kvpool {
namespace {

constexpr size_t kG = MemoryPool::kGranule;

std::unique_ptr<MemoryPool> MakePool(size_t capacity) {
  auto pool = MemoryPool::Create(capacity, HugePages::kOff);
  EXPECT_TRUE(pool.ok()) << pool.status().ToString();
  return pool.ok() ? std::move(pool.value()) : nullptr;
}

TEST(MemoryPool, HugePagesSettingParsesAndNamesTheBadValue) {
  for (const char* name : {"auto", "on", "off"}) {
    const auto huge = ParseHugePages(name);
    ASSERT_TRUE(huge.ok()) << name;
    EXPECT_STREQ(HugePagesName(huge.value()), name);
  }
  const auto bad = ParseHugePages("yes");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("'yes'"), std::string::npos);
}

TEST(MemoryPool, CreateRoundsCapacityUpToGranules) {
  auto pool = MakePool(10 * kG + 1);
  ASSERT_NE(pool, nullptr);
  EXPECT_EQ(pool->capacity(), 11 * kG);
  EXPECT_EQ(pool->used_bytes(), 0u);
  EXPECT_EQ(pool->largest_free_bytes(), 11 * kG);
  EXPECT_FALSE(pool->hugepages());
  EXPECT_NE(pool->base(), nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(pool->base()) % kG, 0u);
}

TEST(MemoryPool, CreateRejectsZeroAndOversizedCapacity) {
  auto zero = MemoryPool::Create(0, HugePages::kOff);
  ASSERT_FALSE(zero.ok());
  EXPECT_EQ(zero.status().code(), ErrorCode::kInvalidArgument);
  auto huge = MemoryPool::Create(size_t{1} << 45, HugePages::kOff);  // 32 TiB > 16 TiB limit
  ASSERT_FALSE(huge.ok());
  EXPECT_EQ(huge.status().code(), ErrorCode::kInvalidArgument);
}

TEST(MemoryPool, ExplicitHugepagesEitherMapOrSayNoSpace) {
  auto pool = MemoryPool::Create(4 << 20, HugePages::kOn);
  if (pool.ok()) {
    EXPECT_TRUE(pool.value()->hugepages());
  } else {
    EXPECT_EQ(pool.status().code(), ErrorCode::kNoSpace);
  }
  // kAuto always succeeds, with or without hugepages.
  auto fallback = MemoryPool::Create(4 << 20, HugePages::kAuto);
  ASSERT_TRUE(fallback.ok()) << fallback.status().ToString();
}

TEST(MemoryPool, AllocateRoundsToGranulesAndAccountsUsedBytes) {
  auto pool = MakePool(64 * kG);
  const int64_t a = pool->Allocate(1);
  const int64_t b = pool->Allocate(kG);
  const int64_t c = pool->Allocate(kG + 1);
  const int64_t z = pool->Allocate(0);  // takes one granule
  for (int64_t off : {a, b, c, z}) {
    ASSERT_GE(off, 0);
    EXPECT_EQ(off % static_cast<int64_t>(kG), 0);
  }
  EXPECT_EQ(pool->RunBytes(a), kG);
  EXPECT_EQ(pool->RunBytes(b), kG);
  EXPECT_EQ(pool->RunBytes(c), 2 * kG);
  EXPECT_EQ(pool->RunBytes(z), kG);
  EXPECT_EQ(pool->used_bytes(), 5 * kG);
  pool->Free(c);
  EXPECT_EQ(pool->used_bytes(), 3 * kG);
  pool->Free(a);
  pool->Free(z);
  pool->Free(b);
  EXPECT_EQ(pool->used_bytes(), 0u);
  EXPECT_EQ(pool->largest_free_bytes(), pool->capacity());
}

TEST(MemoryPool, WholePoolInOneRun) {
  auto pool = MakePool(32 * kG);
  const int64_t all = pool->Allocate(pool->capacity());
  ASSERT_EQ(all, 0);
  EXPECT_EQ(pool->used_bytes(), pool->capacity());
  EXPECT_EQ(pool->largest_free_bytes(), 0u);
  EXPECT_EQ(pool->Allocate(1), -1);
  pool->Free(all);
  EXPECT_EQ(pool->largest_free_bytes(), pool->capacity());
}

TEST(MemoryPool, FailedAllocateLeavesStateIntact) {
  auto pool = MakePool(16 * kG);
  EXPECT_EQ(pool->Allocate(pool->capacity() + 1), -1);
  EXPECT_EQ(pool->Allocate(size_t{1} << 40), -1);
  EXPECT_EQ(pool->used_bytes(), 0u);
  EXPECT_EQ(pool->largest_free_bytes(), pool->capacity());

  std::vector<int64_t> runs;
  for (int i = 0; i < 8; ++i) runs.push_back(pool->Allocate(2 * kG));
  for (int64_t r : runs) ASSERT_GE(r, 0);
  EXPECT_EQ(pool->used_bytes(), pool->capacity());
  for (int i = 0; i < 3; ++i) EXPECT_EQ(pool->Allocate(1), -1);
  // Free two non-adjacent runs: 4 granules free, but no run of 3.
  pool->Free(runs[1]);
  pool->Free(runs[5]);
  EXPECT_EQ(pool->used_bytes(), 12 * kG);
  EXPECT_EQ(pool->Allocate(3 * kG), -1);
  EXPECT_EQ(pool->used_bytes(), 12 * kG);
  EXPECT_EQ(pool->largest_free_bytes(), 2 * kG);
  // The failed calls corrupted nothing: both holes are still usable.
  const int64_t x = pool->Allocate(2 * kG);
  const int64_t y = pool->Allocate(2 * kG);
  EXPECT_EQ(std::min(x, y), runs[1]);
  EXPECT_EQ(std::max(x, y), runs[5]);
  EXPECT_EQ(pool->Allocate(1), -1);
}

TEST(MemoryPool, FreeCoalescesWithBothNeighbours) {
  auto pool = MakePool(3 * kG);
  const int64_t a = pool->Allocate(kG), b = pool->Allocate(kG), c = pool->Allocate(kG);
  pool->Free(a);
  pool->Free(c);
  EXPECT_EQ(pool->largest_free_bytes(), kG);
  EXPECT_EQ(pool->Allocate(2 * kG), -1);
  pool->Free(b);  // joins left and right
  EXPECT_EQ(pool->largest_free_bytes(), 3 * kG);
  EXPECT_EQ(pool->Allocate(3 * kG), 0);
}

TEST(MemoryPool, FreeingAllInRandomOrderCoalescesToOneRun) {
  std::mt19937_64 rng(42);
  for (int round = 0; round < 20; ++round) {
    auto pool = MakePool(512 * kG);
    std::vector<int64_t> live;
    std::uniform_int_distribution<size_t> size(1, 24 * kG);
    while (true) {
      const int64_t off = pool->Allocate(size(rng));
      if (off < 0) break;
      live.push_back(off);
    }
    // Top up with single granules so the pool ends completely full.
    for (int64_t off; (off = pool->Allocate(1)) >= 0;) live.push_back(off);
    EXPECT_EQ(pool->used_bytes(), pool->capacity());
    std::shuffle(live.begin(), live.end(), rng);
    for (int64_t off : live) pool->Free(off);
    EXPECT_EQ(pool->used_bytes(), 0u);
    ASSERT_EQ(pool->largest_free_bytes(), pool->capacity()) << "round " << round;
    EXPECT_EQ(pool->Allocate(pool->capacity()), 0);
  }
}

TEST(MemoryPool, UniformSizesReuseExactHoles) {
  auto pool = MakePool(100 * kG);
  const size_t block = 5 * kG;
  std::vector<int64_t> runs;
  for (int i = 0; i < 20; ++i) runs.push_back(pool->Allocate(block));
  for (int64_t r : runs) ASSERT_GE(r, 0);
  EXPECT_EQ(pool->Allocate(1), -1);
  // A freed hole is handed out again for the next block of the same size.
  for (int i : {7, 0, 19, 11}) {
    pool->Free(runs[i]);
    EXPECT_EQ(pool->Allocate(block), runs[i]);
  }
  // Several holes at once: exactly these offsets come back, nothing is split.
  std::vector<int64_t> freed = {runs[2], runs[9], runs[15]};
  for (int64_t r : freed) pool->Free(r);
  std::vector<int64_t> again;
  for (size_t i = 0; i < freed.size(); ++i) again.push_back(pool->Allocate(block));
  std::sort(again.begin(), again.end());
  EXPECT_EQ(again, freed);
  EXPECT_EQ(pool->used_bytes(), pool->capacity());
}

TEST(MemoryPool, UniformSizesNeverFragment) {
  // Churn with one block size: whenever a block's worth of memory is free, a block fits.
  std::mt19937_64 rng(7);
  const size_t block = 3 * kG;
  auto pool = MakePool(300 * kG);
  std::vector<int64_t> live;
  for (int step = 0; step < 20000; ++step) {
    const bool alloc = live.empty() || (live.size() < 100 && rng() % 2 == 0);
    if (alloc) {
      const int64_t off = pool->Allocate(block);
      ASSERT_GE(off, 0) << "step " << step << " live " << live.size();
      live.push_back(off);
    } else {
      const size_t i = rng() % live.size();
      pool->Free(live[i]);
      live[i] = live.back();
      live.pop_back();
    }
    ASSERT_EQ(pool->used_bytes(), live.size() * block);
  }
}

// A hole that fits must be found even when smaller holes of the same size class are listed first
// (the header promises -1 only "when no free run fits").
TEST(MemoryPool, FindsFittingRunBehindSmallerRunsOfItsClass) {
  auto pool = MakePool(256 * kG);
  // Runs of 16 and 17 granules share a size class.
  const int64_t big = pool->Allocate(17 * kG);
  ASSERT_GE(pool->Allocate(kG), 0);  // separator
  std::vector<int64_t> small;
  for (int i = 0; i < 6; ++i) {
    small.push_back(pool->Allocate(16 * kG));
    ASSERT_GE(pool->Allocate(kG), 0);  // separator
  }
  while (pool->Allocate(1) >= 0) {
  }
  // Free the 17-granule run first, so the 16-granule runs are linked in front of it.
  pool->Free(big);
  for (int64_t s : small) pool->Free(s);
  EXPECT_EQ(pool->largest_free_bytes(), 17 * kG);
  EXPECT_EQ(pool->Allocate(17 * kG), big);
}

TEST(MemoryPool, RandomisedAgainstShadowModel) {
  std::mt19937_64 rng(1234);
  const size_t capacity = 1024 * kG;
  auto pool = MakePool(capacity);
  struct Run {
    size_t bytes;
    uint8_t tag;
  };
  std::map<int64_t, Run> live;  // offset -> run
  size_t used = 0;
  auto check_no_overlap = [&] {
    int64_t end = 0;
    for (const auto& [off, run] : live) {
      ASSERT_GE(off, end) << "runs overlap at " << off;
      end = off + static_cast<int64_t>(run.bytes);
      ASSERT_LE(static_cast<size_t>(end), capacity);
    }
  };
  for (int step = 0; step < 30000; ++step) {
    const bool alloc = live.empty() || rng() % 100 < 55;
    if (alloc) {
      // Mostly small blocks, sometimes large ones, to exercise splitting and coalescing.
      const size_t size = rng() % 8 == 0 ? 1 + rng() % (64 * kG) : 1 + rng() % (4 * kG);
      const size_t granules = (size + kG - 1) / kG;
      const size_t largest = pool->largest_free_bytes();
      const int64_t off = pool->Allocate(size);
      if (off < 0) {
        ASSERT_LT(largest, granules * kG)
            << "allocation failed although a run of " << largest << " bytes was free";
        ASSERT_EQ(pool->used_bytes(), used);
        continue;
      }
      ASSERT_EQ(off % static_cast<int64_t>(kG), 0);
      ASSERT_EQ(pool->RunBytes(off), granules * kG);
      ASSERT_EQ(live.count(off), 0u);
      const auto tag = static_cast<uint8_t>(rng());
      std::memset(pool->base() + off, tag, granules * kG);
      live[off] = Run{granules * kG, tag};
      used += granules * kG;
    } else {
      auto it = live.begin();
      std::advance(it, static_cast<long>(rng() % live.size()));
      // The bytes of a live run were never touched by other allocations.
      const uint8_t* p = pool->base() + it->first;
      for (size_t i = 0; i < it->second.bytes; i += 509)
        ASSERT_EQ(p[i], it->second.tag) << "step " << step;
      ASSERT_EQ(p[it->second.bytes - 1], it->second.tag);
      pool->Free(it->first);
      used -= it->second.bytes;
      live.erase(it);
    }
    ASSERT_EQ(pool->used_bytes(), used);
    if (step % 97 == 0) check_no_overlap();
  }
  check_no_overlap();
  for (const auto& [off, run] : live) pool->Free(off);
  EXPECT_EQ(pool->used_bytes(), 0u);
  EXPECT_EQ(pool->largest_free_bytes(), capacity);
}

}  // namespace
}  // namespace kvpool
