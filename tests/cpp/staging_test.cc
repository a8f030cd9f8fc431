// StagingArena: the client's sealed-memfd staging memory, carved by the pool's allocator and mapped
// a second time by a same-host node.
#include "kvpool/staging.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

namespace kvpool {
namespace {

constexpr size_t kMiB = size_t{1} << 20;
constexpr size_t kRound = 2 * kMiB;
constexpr size_t kRun = 4096;  // Take's runs are rounded up to 4 KiB

std::shared_ptr<StagingArena> MakeArena(size_t bytes) {
  auto arena = StagingArena::Create(bytes);
  EXPECT_TRUE(arena.ok()) << arena.status().ToString();
  return arena.ok() ? arena.value() : nullptr;
}

TEST(StagingArena, ZeroBytesIsInvalidArgument) {
  const auto arena = StagingArena::Create(0);
  ASSERT_FALSE(arena.ok());
  EXPECT_EQ(arena.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_FALSE(arena.status().message().empty());
}

TEST(StagingArena, SizeRoundsUpToTwoMiB) {
  // "Maps `bytes` (rounded up to 2 MiB)": the memfd itself has the rounded size too.
  const std::pair<size_t, size_t> cases[] = {{1, kRound},
                                             {kRound - 1, kRound},
                                             {kRound, kRound},
                                             {kRound + 1, 2 * kRound},
                                             {5 * kMiB, 6 * kMiB}};
  for (const auto& [asked, expected] : cases) {
    const auto arena = MakeArena(asked);
    ASSERT_NE(arena, nullptr) << asked;
    EXPECT_EQ(arena->size(), expected) << asked;
    struct stat st{};
    ASSERT_EQ(fstat(arena->fd(), &st), 0);
    EXPECT_EQ(static_cast<size_t>(st.st_size), expected) << asked;
    EXPECT_NE(arena->base(), nullptr);
    EXPECT_EQ(arena->used_bytes(), 0u);
  }
}

TEST(StagingArena, MemfdIsSealedAgainstShrinkGrowAndFurtherSeals) {
  // Sealed so that a node mapping the arena can rely on its size: SHRINK | GROW | SEAL exactly
  // (no WRITE seal: the node writes GET blocks into it).
  const auto arena = MakeArena(1);
  ASSERT_NE(arena, nullptr);
  const int seals = fcntl(arena->fd(), F_GET_SEALS);
  ASSERT_GE(seals, 0) << std::strerror(errno);
  EXPECT_EQ(seals, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);

  errno = 0;
  EXPECT_NE(ftruncate(arena->fd(), static_cast<off_t>(arena->size() / 2)), 0);
  EXPECT_EQ(errno, EPERM);
  errno = 0;
  EXPECT_NE(ftruncate(arena->fd(), static_cast<off_t>(arena->size() * 2)), 0);
  EXPECT_EQ(errno, EPERM);
  errno = 0;
  EXPECT_NE(ftruncate(arena->fd(), 0), 0);
  EXPECT_EQ(errno, EPERM);
  // F_SEAL_SEAL: no further seal can be added (a write seal would break the node's GET path).
  EXPECT_NE(fcntl(arena->fd(), F_ADD_SEALS, F_SEAL_WRITE), 0);

  struct stat st{};
  ASSERT_EQ(fstat(arena->fd(), &st), 0);
  EXPECT_EQ(static_cast<size_t>(st.st_size), arena->size());
}

TEST(StagingArena, TakeReturnsExactlyTheAskedBytesInsideTheArena) {
  const auto arena = MakeArena(1);
  ASSERT_NE(arena, nullptr);
  for (size_t n : {size_t{1}, size_t{100}, kRun, kRun + 1, size_t{64} << 10}) {
    const MutableBuffer b = arena->Take(n);
    ASSERT_NE(b.data, nullptr) << n;
    EXPECT_EQ(b.size, n);
    const auto off = arena->Offset(b.data, b.size);
    ASSERT_TRUE(off.has_value()) << n;
    EXPECT_EQ(*off % kRun, 0u) << "runs start on 4 KiB boundaries";
    arena->Give(b.data);
  }
  EXPECT_EQ(arena->used_bytes(), 0u);
}

TEST(StagingArena, TakeUntilFullReturnsNullThenGiveMakesRoomAgain) {
  // "{nullptr, 0} when the arena has no room (never blocks)"; a Give makes that room usable.
  const auto arena = MakeArena(1);
  ASSERT_NE(arena, nullptr);
  const size_t runs = arena->size() / kRun;
  std::vector<MutableBuffer> taken;
  for (size_t i = 0; i < runs; ++i) {
    const MutableBuffer b = arena->Take(kRun);
    ASSERT_NE(b.data, nullptr) << "run " << i << " of " << runs;
    taken.push_back(b);
  }
  EXPECT_EQ(arena->used_bytes(), arena->size());
  const MutableBuffer full = arena->Take(1);
  EXPECT_EQ(full.data, nullptr);
  EXPECT_EQ(full.size, 0u);

  // Giving one run back makes exactly that much room again.
  arena->Give(taken[runs / 2].data);
  EXPECT_EQ(arena->used_bytes(), arena->size() - kRun);
  EXPECT_EQ(arena->Take(kRun + 1).data, nullptr) << "only one run is free";
  const MutableBuffer again = arena->Take(kRun);
  ASSERT_NE(again.data, nullptr);
  EXPECT_EQ(again.data, taken[runs / 2].data);
  EXPECT_EQ(arena->Take(1).data, nullptr);

  taken[runs / 2] = again;
  for (const auto& b : taken) arena->Give(b.data);
  EXPECT_EQ(arena->used_bytes(), 0u);
  // Once everything is back, the whole arena is one run again.
  const MutableBuffer whole = arena->Take(arena->size());
  EXPECT_EQ(whole.data, arena->base());
  EXPECT_EQ(whole.size, arena->size());
}

TEST(StagingArena, TakeLargerThanTheArenaReturnsNull) {
  const auto arena = MakeArena(1);
  ASSERT_NE(arena, nullptr);
  const MutableBuffer b = arena->Take(arena->size() + 1);
  EXPECT_EQ(b.data, nullptr);
  EXPECT_EQ(b.size, 0u);
  EXPECT_EQ(arena->used_bytes(), 0u);
}

TEST(StagingArena, UsedBytesTracksTakeAndGiveInWholeRuns) {
  const auto arena = MakeArena(1);
  ASSERT_NE(arena, nullptr);
  EXPECT_EQ(arena->used_bytes(), 0u);
  const MutableBuffer a = arena->Take(1);  // one 4 KiB run
  ASSERT_NE(a.data, nullptr);
  EXPECT_EQ(arena->used_bytes(), kRun);
  const MutableBuffer b = arena->Take(kRun + 1);  // two runs
  ASSERT_NE(b.data, nullptr);
  EXPECT_EQ(arena->used_bytes(), 3 * kRun);
  const MutableBuffer c = arena->Take(3 * kRun);
  ASSERT_NE(c.data, nullptr);
  EXPECT_EQ(arena->used_bytes(), 6 * kRun);
  arena->Give(a.data);
  EXPECT_EQ(arena->used_bytes(), 5 * kRun);
  arena->Give(c.data);
  EXPECT_EQ(arena->used_bytes(), 2 * kRun);
  arena->Give(b.data);
  EXPECT_EQ(arena->used_bytes(), 0u);
}

TEST(StagingArena, GiveOfAFailedTakeIsANoOp) {
  // A caller that fell back to its own memory may hand back the {nullptr, 0} it got (Give only
  // frees addresses inside the arena).
  const auto arena = MakeArena(1);
  ASSERT_NE(arena, nullptr);
  const MutableBuffer a = arena->Take(kRun);
  ASSERT_NE(a.data, nullptr);
  arena->Give(nullptr);
  uint8_t outside[16];
  arena->Give(outside);
  EXPECT_EQ(arena->used_bytes(), kRun);
  arena->Give(a.data);
  EXPECT_EQ(arena->used_bytes(), 0u);
}

TEST(StagingArena, OffsetOnlyForRangesWhollyInside) {
  const auto arena = MakeArena(1);
  ASSERT_NE(arena, nullptr);
  const uint8_t* base = arena->base();
  const size_t size = arena->size();
  // Inside and at both edges.
  EXPECT_EQ(arena->Offset(base + 10, 20), std::optional<uint64_t>(10));
  EXPECT_EQ(arena->Offset(base, size), std::optional<uint64_t>(0));
  EXPECT_EQ(arena->Offset(base, 1), std::optional<uint64_t>(0));
  EXPECT_EQ(arena->Offset(base + size - 1, 1), std::optional<uint64_t>(size - 1));
  EXPECT_EQ(arena->Offset(base + size - 100, 100), std::optional<uint64_t>(size - 100));
  // Wholly outside.
  EXPECT_EQ(arena->Offset(base - 1, 1), std::nullopt);
  EXPECT_EQ(arena->Offset(base - 4096, 100), std::nullopt);
  EXPECT_EQ(arena->Offset(base + size, 1), std::nullopt);
  EXPECT_EQ(arena->Offset(base + size + 4096, 1), std::nullopt);
  EXPECT_EQ(arena->Offset(nullptr, 1), std::nullopt);
  uint8_t stack[8];
  EXPECT_EQ(arena->Offset(stack, sizeof stack), std::nullopt);
  // Straddling either end, or longer than the arena.
  EXPECT_EQ(arena->Offset(base - 1, 2), std::nullopt);
  EXPECT_EQ(arena->Offset(base - 5, 10), std::nullopt);
  EXPECT_EQ(arena->Offset(base + size - 10, 11), std::nullopt);
  EXPECT_EQ(arena->Offset(base + size - 1, 2), std::nullopt);
  EXPECT_EQ(arena->Offset(base, size + 1), std::nullopt);
  EXPECT_EQ(arena->Offset(base + 1, size), std::nullopt);
  // A length that would wrap an addition (p + n) must not read as inside.
  EXPECT_EQ(arena->Offset(base + 10, SIZE_MAX), std::nullopt);
  EXPECT_EQ(arena->Offset(base + 10, SIZE_MAX - 5), std::nullopt);
  // n == 0: an empty range is inside wherever its address is (the end included), not beyond.
  EXPECT_EQ(arena->Offset(base, 0), std::optional<uint64_t>(0));
  EXPECT_EQ(arena->Offset(base + 123, 0), std::optional<uint64_t>(123));
  EXPECT_EQ(arena->Offset(base + size, 0), std::optional<uint64_t>(size));
  EXPECT_EQ(arena->Offset(base + size + 1, 0), std::nullopt);
  EXPECT_EQ(arena->Offset(base - 1, 0), std::nullopt);
}

TEST(StagingArena, BytesAreSharedWithASecondMappingOfTheFd) {
  // What a same-host node relies on: it maps fd() itself, and bytes written on either side are
  // the same memory.
  const auto arena = MakeArena(3 * kMiB);
  ASSERT_NE(arena, nullptr);
  void* p = mmap(nullptr, arena->size(), PROT_READ | PROT_WRITE, MAP_SHARED, arena->fd(), 0);
  ASSERT_NE(p, MAP_FAILED) << std::strerror(errno);
  auto* other = static_cast<uint8_t*>(p);
  ASSERT_NE(other, arena->base());

  // Client writes through base(): the node's mapping sees them (start, middle and last byte).
  const MutableBuffer b = arena->Take(100000);
  ASSERT_NE(b.data, nullptr);
  for (size_t i = 0; i < b.size; ++i) b.data[i] = static_cast<uint8_t>(i * 7 + 3);
  const uint64_t off = *arena->Offset(b.data, b.size);
  EXPECT_EQ(std::memcmp(other + off, b.data, b.size), 0);
  arena->base()[arena->size() - 1] = 0x5A;
  EXPECT_EQ(other[arena->size() - 1], 0x5A);

  // Node writes through its mapping: the client reads them through base().
  std::memset(other + off, 0xC3, b.size);
  for (size_t i = 0; i < b.size; ++i) ASSERT_EQ(b.data[i], 0xC3) << i;

  arena->Give(b.data);
  munmap(p, arena->size());
}

TEST(StagingArena, ConcurrentTakeAndGiveNeverHandOutOverlappingBuffers) {
  // Take and Give are thread-safe: several threads taking and giving at once never get two live
  // buffers that overlap, and each live buffer keeps the bytes its owner wrote.
  const auto arena = MakeArena(8 * kMiB);
  ASSERT_NE(arena, nullptr);
  constexpr int kThreads = 4;
  constexpr int kIterations = 3000;
  constexpr size_t kMaxLive = 8;

  std::mutex live_mu;
  std::map<uint64_t, uint64_t> live;  // offset -> end of every buffer currently taken
  std::atomic<int> overlaps{0}, corrupted{0}, taken{0}, refused{0};

  auto worker = [&](int id) {
    std::mt19937_64 rng(1234 + id);
    std::vector<MutableBuffer> mine;
    auto give_one = [&](size_t k) {
      const MutableBuffer b = mine[k];
      const auto tag = static_cast<uint8_t>(id + 1);
      for (size_t i = 0; i < b.size; i += 511) {
        if (b.data[i] != tag) {
          ++corrupted;
          break;
        }
      }
      if (b.data[b.size - 1] != tag) ++corrupted;
      {
        // Out of the live set before Give: once given, another thread may take it at once.
        std::lock_guard<std::mutex> lock(live_mu);
        live.erase(*arena->Offset(b.data, b.size));
      }
      arena->Give(b.data);
      mine.erase(mine.begin() + static_cast<std::ptrdiff_t>(k));
    };
    for (int it = 0; it < kIterations; ++it) {
      if (mine.size() >= kMaxLive || (!mine.empty() && rng() % 3 == 0)) {
        give_one(rng() % mine.size());
        continue;
      }
      const size_t n = 1 + rng() % (96 << 10);
      const MutableBuffer b = arena->Take(n);
      if (b.data == nullptr) {
        ++refused;
        continue;
      }
      ++taken;
      const uint64_t off = *arena->Offset(b.data, b.size);
      {
        std::lock_guard<std::mutex> lock(live_mu);
        auto next = live.lower_bound(off);
        if (next != live.end() && next->first < off + b.size) ++overlaps;
        if (next != live.begin() && std::prev(next)->second > off) ++overlaps;
        live[off] = off + b.size;
      }
      std::memset(b.data, id + 1, b.size);
      mine.push_back(b);
    }
    while (!mine.empty()) give_one(mine.size() - 1);
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
  for (auto& t : threads) t.join();

  EXPECT_EQ(overlaps.load(), 0);
  EXPECT_EQ(corrupted.load(), 0);
  EXPECT_GT(taken.load(), kThreads * kIterations / 2);
  EXPECT_TRUE(live.empty());
  EXPECT_EQ(arena->used_bytes(), 0u);
  const MutableBuffer whole = arena->Take(arena->size());
  EXPECT_EQ(whole.data, arena->base()) << "every run coalesced back after the threads gave back";
}

}  // namespace
}  // namespace kvpool
