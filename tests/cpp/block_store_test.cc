// BlockStore: reserve -> fill -> commit visibility, pins, deletion, eviction and its counters.
#include "kvpool/block_store.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <random>
#include <set>
#include <thread>
#include <vector>

namespace kvpool {
namespace {

constexpr size_t kG = MemoryPool::kGranule;

std::unique_ptr<BlockStore> MakeStore(size_t capacity,
                                      EvictionKind eviction = EvictionKind::kS3Fifo,
                                      double high_watermark = 1.0) {
  BlockStoreOptions options;
  options.capacity = capacity;
  options.hugepages = HugePages::kOff;
  options.eviction = eviction;
  options.high_watermark = high_watermark;
  auto store = BlockStore::Create(options);
  EXPECT_TRUE(store.ok()) << store.status().ToString();
  return store.ok() ? std::move(store.value()) : nullptr;
}

Key128 KeyOf(uint64_t i) { return Hash128(&i, sizeof i); }

/// The bytes block `id` is filled with: distinct per block and per position.
uint8_t ByteOf(uint64_t id, size_t pos) {
  return static_cast<uint8_t>(id * 131 + pos * 7 + (pos >> 9));
}

void Fill(uint8_t* dst, size_t size, uint64_t id) {
  for (size_t i = 0; i < size; ++i) dst[i] = ByteOf(id, i);
}

bool HasBytes(const uint8_t* p, size_t size, uint64_t id) {
  for (size_t i = 0; i < size; ++i) {
    if (p[i] != ByteOf(id, i)) return false;
  }
  return true;
}

PutResult Put(BlockStore& store, const Key128& key, size_t size, uint64_t fill_id,
              bool* stored = nullptr) {
  const uint64_t sizes[1] = {size};
  PutResult result[1];
  Reservation r[1];
  store.Reserve(std::span<const Key128>(&key, 1), sizes, result, r);
  if (result[0] != PutResult::kReserved) return result[0];
  EXPECT_EQ(r[0].size, size);
  EXPECT_NE(r[0].data, nullptr);
  Fill(r[0].data, size, fill_id);
  bool ok[1] = {false};
  store.Commit(std::span<const Key128>(&key, 1), r, ok);
  if (stored != nullptr) *stored = ok[0];
  return result[0];
}

PutResult Put(BlockStore& store, uint64_t id, size_t size) {
  return Put(store, KeyOf(id), size, id);
}

bool Contains(const BlockStore& store, const Key128& key) {
  bool present[1] = {false};
  store.Contains(std::span<const Key128>(&key, 1), present);
  return present[0];
}
bool Contains(const BlockStore& store, uint64_t id) { return Contains(store, KeyOf(id)); }

/// Pins, checks the bytes, unpins. False when absent.
bool ReadBack(BlockStore& store, uint64_t id, size_t size) {
  const Key128 key = KeyOf(id);
  PinnedBlock b[1];
  bool found[1];
  store.Pin(std::span<const Key128>(&key, 1), b, found);
  if (!found[0]) return false;
  EXPECT_EQ(b[0].size, size);
  EXPECT_TRUE(HasBytes(b[0].data, b[0].size, id)) << "block " << id << " has wrong bytes";
  store.Unpin(b);
  return true;
}

bool Delete(BlockStore& store, uint64_t id) {
  const Key128 key = KeyOf(id);
  bool deleted[1];
  store.Delete(std::span<const Key128>(&key, 1), deleted);
  return deleted[0];
}

TEST(BlockStore, CreateRejectsBadWatermark) {
  for (double w : {0.0, -0.5, 1.01}) {
    BlockStoreOptions options;
    options.capacity = 64 * kG;
    options.hugepages = HugePages::kOff;
    options.high_watermark = w;
    auto store = BlockStore::Create(options);
    ASSERT_FALSE(store.ok()) << w;
    EXPECT_EQ(store.status().code(), ErrorCode::kInvalidArgument);
  }
}

TEST(BlockStore, ReservedButUncommittedIsInvisible) {
  auto store = MakeStore(64 * kG);
  const Key128 keys[2] = {KeyOf(1), KeyOf(2)};
  ASSERT_EQ(Put(*store, 1, 1000), PutResult::kReserved);

  const uint64_t sizes[1] = {5000};
  PutResult result[1];
  Reservation r[1];
  store->Reserve(std::span<const Key128>(&keys[1], 1), sizes, result, r);
  ASSERT_EQ(result[0], PutResult::kReserved);
  Fill(r[0].data, 5000, 2);
  EXPECT_EQ(store->Stats().reserved_blocks, 1u);
  EXPECT_EQ(store->Stats().used_bytes, 3 * kG);

  EXPECT_FALSE(Contains(*store, 2));
  EXPECT_EQ(store->MatchPrefix(keys), 1u);
  PinnedBlock pinned[1];
  bool found[1] = {true};
  store->Pin(std::span<const Key128>(&keys[1], 1), pinned, found);
  EXPECT_FALSE(found[0]);
  bool deleted[1] = {true};
  store->Delete(std::span<const Key128>(&keys[1], 1), deleted);
  EXPECT_FALSE(deleted[0]);

  bool stored[1] = {false};
  store->Commit(std::span<const Key128>(&keys[1], 1), r, stored);
  EXPECT_TRUE(stored[0]);
  EXPECT_TRUE(Contains(*store, 2));
  EXPECT_EQ(store->MatchPrefix(keys), 2u);
  EXPECT_TRUE(ReadBack(*store, 2, 5000));
  const BlockStoreStats s = store->Stats();
  EXPECT_EQ(s.reserved_blocks, 0u);
  EXPECT_EQ(s.entries, 2u);
}

TEST(BlockStore, AbortFreesTheReservation) {
  auto store = MakeStore(64 * kG);
  const Key128 keys[3] = {KeyOf(1), KeyOf(2), KeyOf(3)};
  const uint64_t sizes[3] = {kG, 3 * kG + 1, 10};
  PutResult result[3];
  Reservation r[3];
  store->Reserve(keys, sizes, result, r);
  for (PutResult p : result) ASSERT_EQ(p, PutResult::kReserved);
  EXPECT_EQ(store->Stats().used_bytes, 6 * kG);
  EXPECT_EQ(store->Stats().reserved_blocks, 3u);
  store->Abort(r);
  const BlockStoreStats s = store->Stats();
  EXPECT_EQ(s.used_bytes, 0u);
  EXPECT_EQ(s.reserved_blocks, 0u);
  EXPECT_EQ(s.entries, 0u);
  EXPECT_EQ(s.stored, 0u);
  for (uint64_t id : {1, 2, 3}) EXPECT_FALSE(Contains(*store, id));
  EXPECT_EQ(store->pool().largest_free_bytes(), store->pool().capacity());
  // The key can be written afterwards.
  EXPECT_EQ(Put(*store, 2, 777), PutResult::kReserved);
  EXPECT_TRUE(ReadBack(*store, 2, 777));
}

TEST(BlockStore, ReserveOfCommittedKeyIsExists) {
  auto store = MakeStore(64 * kG);
  ASSERT_EQ(Put(*store, 5, 100), PutResult::kReserved);
  const uint64_t used = store->Stats().used_bytes;
  EXPECT_EQ(Put(*store, KeyOf(5), 100, /*fill_id=*/99), PutResult::kExists);
  EXPECT_EQ(store->Stats().used_bytes, used);
  EXPECT_EQ(store->Stats().reserved_blocks, 0u);
  EXPECT_EQ(store->Stats().existing, 1u);
  EXPECT_TRUE(ReadBack(*store, 5, 100));
}

TEST(BlockStore, DuplicateCommitKeepsFirstBytesAndFreesSecond) {
  auto store = MakeStore(64 * kG);
  const Key128 key = KeyOf(9);
  const uint64_t sizes[1] = {2 * kG};
  PutResult ra[1], rb[1];
  Reservation a[1], b[1];
  // Two writers race for the same key: both reserve before either commits.
  store->Reserve(std::span<const Key128>(&key, 1), sizes, ra, a);
  store->Reserve(std::span<const Key128>(&key, 1), sizes, rb, b);
  ASSERT_EQ(ra[0], PutResult::kReserved);
  ASSERT_EQ(rb[0], PutResult::kReserved);
  EXPECT_NE(a[0].offset, b[0].offset);
  EXPECT_EQ(store->Stats().used_bytes, 4 * kG);
  Fill(a[0].data, 2 * kG, 9);
  Fill(b[0].data, 2 * kG, 1000);
  bool stored_a[1], stored_b[1];
  store->Commit(std::span<const Key128>(&key, 1), a, stored_a);
  store->Commit(std::span<const Key128>(&key, 1), b, stored_b);
  EXPECT_TRUE(stored_a[0]);
  EXPECT_FALSE(stored_b[0]);
  const BlockStoreStats s = store->Stats();
  EXPECT_EQ(s.used_bytes, 2 * kG);
  EXPECT_EQ(s.entries, 1u);
  EXPECT_EQ(s.stored, 1u);
  EXPECT_EQ(s.existing, 1u);
  EXPECT_EQ(s.reserved_blocks, 0u);
  EXPECT_EQ(s.bytes_in, 2 * kG);
  EXPECT_TRUE(ReadBack(*store, 9, 2 * kG));
}

TEST(BlockStore, SameKeyTwiceInOneBatch) {
  auto store = MakeStore(64 * kG);
  const Key128 keys[2] = {KeyOf(4), KeyOf(4)};
  const uint64_t sizes[2] = {100, 100};
  PutResult result[2];
  Reservation r[2];
  store->Reserve(keys, sizes, result, r);
  for (int i = 0; i < 2; ++i) {
    ASSERT_EQ(result[i], PutResult::kReserved);
    Fill(r[i].data, 100, i == 0 ? 4 : 40);
  }
  bool stored[2];
  store->Commit(keys, r, stored);
  EXPECT_TRUE(stored[0]);
  EXPECT_FALSE(stored[1]);
  EXPECT_EQ(store->Stats().used_bytes, kG);
  EXPECT_TRUE(ReadBack(*store, 4, 100));
}

TEST(BlockStore, MatchPrefixCountsLeadingCommittedKeys) {
  auto store = MakeStore(64 * kG);
  for (uint64_t id : {0, 1, 2, 4}) ASSERT_EQ(Put(*store, id, 10), PutResult::kReserved);
  std::vector<Key128> keys;
  for (uint64_t id = 0; id < 6; ++id) keys.push_back(KeyOf(id));
  EXPECT_EQ(store->MatchPrefix(keys), 3u);
  EXPECT_EQ(store->MatchPrefix(std::span<const Key128>(keys.data(), 2)), 2u);
  EXPECT_EQ(store->MatchPrefix(std::span<const Key128>(keys.data() + 3, 3)), 0u);
  EXPECT_EQ(store->MatchPrefix({}), 0u);
}

TEST(BlockStore, DeleteUnpinnedFreesAtOnce) {
  auto store = MakeStore(64 * kG);
  ASSERT_EQ(Put(*store, 1, 3 * kG), PutResult::kReserved);
  EXPECT_TRUE(Delete(*store, 1));
  EXPECT_FALSE(Delete(*store, 1));
  EXPECT_FALSE(Delete(*store, 2));
  const BlockStoreStats s = store->Stats();
  EXPECT_EQ(s.used_bytes, 0u);
  EXPECT_EQ(s.entries, 0u);
  EXPECT_EQ(s.deletes, 1u);
  EXPECT_FALSE(Contains(*store, 1));
}

TEST(BlockStore, DeletingAPinnedBlockFreesItAtLastUnpin) {
  auto store = MakeStore(64 * kG);
  ASSERT_EQ(Put(*store, 1, 2 * kG), PutResult::kReserved);
  const Key128 key = KeyOf(1);
  PinnedBlock p1[1], p2[1];
  bool found[1];
  store->Pin(std::span<const Key128>(&key, 1), p1, found);
  ASSERT_TRUE(found[0]);
  store->Pin(std::span<const Key128>(&key, 1), p2, found);
  ASSERT_TRUE(found[0]);
  EXPECT_EQ(store->Stats().pinned_blocks, 1u);

  EXPECT_TRUE(Delete(*store, 1));
  EXPECT_FALSE(Contains(*store, 1));
  EXPECT_EQ(store->Stats().entries, 0u);
  EXPECT_EQ(store->Stats().used_bytes, 2 * kG);  // still under the readers

  // A new block under the same key is independent of the doomed one.
  ASSERT_EQ(Put(*store, key, 5 * kG, /*fill_id=*/77), PutResult::kReserved);
  EXPECT_EQ(store->Stats().used_bytes, 7 * kG);
  // Nothing overwrote the readers' bytes.
  EXPECT_TRUE(HasBytes(p1[0].data, p1[0].size, 1));

  store->Unpin(p1);
  EXPECT_EQ(store->Stats().used_bytes, 7 * kG);
  EXPECT_TRUE(HasBytes(p2[0].data, p2[0].size, 1));
  store->Unpin(p2);
  const BlockStoreStats s = store->Stats();
  EXPECT_EQ(s.used_bytes, 5 * kG);
  EXPECT_EQ(s.pinned_blocks, 0u);
  EXPECT_EQ(s.entries, 1u);
  PinnedBlock now[1];
  store->Pin(std::span<const Key128>(&key, 1), now, found);
  ASSERT_TRUE(found[0]);
  EXPECT_EQ(now[0].size, 5 * kG);
  EXPECT_TRUE(HasBytes(now[0].data, now[0].size, 77));
  store->Unpin(now);
}

class EvictionTest : public ::testing::TestWithParam<EvictionKind> {};

TEST_P(EvictionTest, PinnedBlocksSurviveEviction) {
  auto store = MakeStore(64 * kG, GetParam());
  const size_t size = 2 * kG;
  for (uint64_t id = 0; id < 8; ++id) ASSERT_EQ(Put(*store, id, size), PutResult::kReserved);
  std::vector<Key128> keys;
  for (uint64_t id = 0; id < 8; ++id) keys.push_back(KeyOf(id));
  std::vector<PinnedBlock> pinned(8);
  bool found[8];
  store->Pin(keys, pinned, found);
  for (bool f : found) ASSERT_TRUE(f);
  // Ten times the capacity of new blocks: everything else is evicted, over and over.
  for (uint64_t id = 100; id < 420; ++id) {
    ASSERT_EQ(Put(*store, id, size), PutResult::kReserved) << id;
    ASSERT_LE(store->Stats().used_bytes, store->Stats().high_watermark_bytes);
  }
  EXPECT_GT(store->Stats().evictions, 250u);
  for (size_t i = 0; i < 8; ++i) {
    EXPECT_TRUE(Contains(*store, i));
    EXPECT_TRUE(HasBytes(pinned[i].data, pinned[i].size, i)) << i;
  }
  store->Unpin(pinned);
  EXPECT_EQ(store->Stats().pinned_blocks, 0u);
  // Unpinned, they are ordinary blocks again: deleting them frees their memory at once.
  const uint64_t used = store->Stats().used_bytes;
  for (uint64_t id = 0; id < 8; ++id) EXPECT_TRUE(Delete(*store, id));
  EXPECT_EQ(store->Stats().used_bytes, used - 8 * size);
}

TEST_P(EvictionTest, UsageStaysUnderHighWatermark) {
  auto store = MakeStore(256 * kG, GetParam(), 0.75);
  const BlockStoreStats initial = store->Stats();
  EXPECT_EQ(initial.capacity_bytes, 256 * kG);
  EXPECT_EQ(initial.high_watermark_bytes, 192 * kG);
  std::mt19937_64 rng(3);
  std::vector<size_t> size_of(3000);
  for (uint64_t id = 0; id < size_of.size(); ++id) {
    size_of[id] = 1 + rng() % (6 * kG);
    ASSERT_EQ(Put(*store, id, size_of[id]), PutResult::kReserved) << id;
    const BlockStoreStats s = store->Stats();
    ASSERT_LE(s.used_bytes, s.high_watermark_bytes) << id;
    ASSERT_EQ(s.stored, id + 1);
    ASSERT_EQ(s.entries + s.evictions, s.stored);
  }
  // Whatever survived has its own bytes.
  size_t present = 0;
  for (uint64_t id = 0; id < size_of.size(); ++id)
    present += ReadBack(*store, id, size_of[id]) ? 1 : 0;
  EXPECT_EQ(present, store->Stats().entries);
  EXPECT_GT(present, 0u);
}

TEST_P(EvictionTest, NoSpaceWhenEverythingIsPinned) {
  auto store = MakeStore(16 * kG, GetParam());
  std::vector<Key128> keys;
  for (uint64_t id = 0; id < 8; ++id) {
    ASSERT_EQ(Put(*store, id, 2 * kG), PutResult::kReserved);
    keys.push_back(KeyOf(id));
  }
  std::vector<PinnedBlock> pinned(8);
  bool found[8];
  store->Pin(keys, pinned, found);
  EXPECT_EQ(Put(*store, 100, 1), PutResult::kNoSpace);
  BlockStoreStats s = store->Stats();
  EXPECT_EQ(s.rejected, 1u);
  EXPECT_EQ(s.evictions, 0u);
  EXPECT_EQ(s.entries, 8u);
  EXPECT_EQ(s.reserved_blocks, 0u);
  // Unpinning one block makes room again.
  store->Unpin(std::span<const PinnedBlock>(pinned.data(), 1));
  EXPECT_EQ(Put(*store, 100, 1), PutResult::kReserved);
  EXPECT_FALSE(Contains(*store, 0));
  EXPECT_EQ(store->Stats().evictions, 1u);
  store->Unpin(std::span<const PinnedBlock>(pinned.data() + 1, 7));
}

TEST_P(EvictionTest, ReservationsAreNeverEvicted) {
  auto store = MakeStore(16 * kG, GetParam());
  std::vector<Key128> keys;
  std::vector<uint64_t> sizes;
  for (uint64_t id = 0; id < 4; ++id) {
    keys.push_back(KeyOf(id));
    sizes.push_back(4 * kG);
  }
  std::vector<PutResult> result(4);
  std::vector<Reservation> r(4);
  store->Reserve(keys, sizes, result, r);
  for (PutResult p : result) ASSERT_EQ(p, PutResult::kReserved);
  EXPECT_EQ(Put(*store, 50, 1), PutResult::kNoSpace);
  for (size_t i = 0; i < 4; ++i) Fill(r[i].data, sizes[i], i);
  bool stored[4];
  store->Commit(keys, r, stored);
  for (bool s : stored) EXPECT_TRUE(s);
  for (uint64_t id = 0; id < 4; ++id) EXPECT_TRUE(ReadBack(*store, id, 4 * kG));
}

TEST_P(EvictionTest, TooLargeForTheWatermark) {
  auto store = MakeStore(64 * kG, GetParam(), 0.5);
  ASSERT_EQ(Put(*store, 1, kG), PutResult::kReserved);
  EXPECT_EQ(Put(*store, 2, 32 * kG + 1), PutResult::kTooLarge);
  EXPECT_EQ(Put(*store, 3, size_t{1} << 40), PutResult::kTooLarge);
  EXPECT_EQ(Put(*store, 4, ~uint64_t{0}), PutResult::kTooLarge);
  const BlockStoreStats s = store->Stats();
  EXPECT_EQ(s.rejected, 3u);
  EXPECT_EQ(s.evictions, 0u);  // a hopeless block must not flush the cache
  EXPECT_TRUE(Contains(*store, 1));
  // Exactly the watermark fits (after evicting the rest).
  EXPECT_EQ(Put(*store, 5, 32 * kG), PutResult::kReserved);
  EXPECT_TRUE(ReadBack(*store, 5, 32 * kG));
}

// A block whose size is under the watermark but whose granule-rounded footprint is over it can
// never be stored either; it must be refused as TooLarge without evicting anything.
TEST_P(EvictionTest, TooLargeAfterRoundingToGranules) {
  auto store = MakeStore(256 * kG, GetParam(), 0.95);
  const uint64_t watermark = store->Stats().high_watermark_bytes;
  ASSERT_NE(watermark % kG, 0u) << "test needs an unaligned watermark";
  for (uint64_t id = 0; id < 10; ++id) ASSERT_EQ(Put(*store, id, kG), PutResult::kReserved);
  EXPECT_EQ(Put(*store, 100, watermark), PutResult::kTooLarge);
  const BlockStoreStats s = store->Stats();
  EXPECT_EQ(s.evictions, 0u);
  EXPECT_EQ(s.entries, 10u);
}

// An empty block still occupies a granule, so it must evict like any other once the pool is at
// the watermark (tests/fuzz/frame_fuzzer's invariants caught zero-length PUTs to a full node
// pushing usage a granule over it).
TEST_P(EvictionTest, EmptyBlocksStayUnderHighWatermark) {
  auto store = MakeStore(64 * kG, GetParam(), 0.95);
  for (uint64_t id = 0; id < 100; ++id) ASSERT_EQ(Put(*store, id, kG), PutResult::kReserved);
  for (uint64_t id = 1000; id < 1100; ++id) {
    ASSERT_EQ(Put(*store, id, 0), PutResult::kReserved) << id;
    const BlockStoreStats s = store->Stats();
    ASSERT_LE(s.used_bytes, s.high_watermark_bytes) << id;
  }
  EXPECT_TRUE(ReadBack(*store, 1099, 0));
}

INSTANTIATE_TEST_SUITE_P(Policies, EvictionTest,
                         ::testing::Values(EvictionKind::kS3Fifo, EvictionKind::kLru),
                         [](const auto& info) {
                           return std::string(EvictionKindName(info.param));
                         });

/// Hot blocks read a few times, then a one-pass scan of 4x the capacity of blocks read never.
std::vector<bool> HotSetAfterScan(EvictionKind kind) {
  auto store = MakeStore(128 * kG, kind);
  const size_t size = 2 * kG;  // 64 blocks fit
  for (uint64_t id = 0; id < 8; ++id) EXPECT_EQ(Put(*store, id, size), PutResult::kReserved);
  for (int round = 0; round < 3; ++round) {
    for (uint64_t id = 0; id < 8; ++id) EXPECT_TRUE(ReadBack(*store, id, size));
  }
  for (uint64_t id = 1000; id < 1256; ++id) EXPECT_EQ(Put(*store, id, size), PutResult::kReserved);
  EXPECT_GT(store->Stats().evictions, 150u);
  std::vector<bool> present;
  for (uint64_t id = 0; id < 8; ++id) present.push_back(Contains(*store, id));
  return present;
}

TEST(BlockStore, S3FifoKeepsHotSetThroughAScan) {
  EXPECT_EQ(HotSetAfterScan(EvictionKind::kS3Fifo), std::vector<bool>(8, true));
}

TEST(BlockStore, LruLosesHotSetToAScan) {
  EXPECT_EQ(HotSetAfterScan(EvictionKind::kLru), std::vector<bool>(8, false));
}

TEST(BlockStore, LruEvictsLeastRecentlyRead) {
  auto store = MakeStore(16 * kG, EvictionKind::kLru);
  for (uint64_t id = 0; id < 4; ++id) ASSERT_EQ(Put(*store, id, 4 * kG), PutResult::kReserved);
  EXPECT_TRUE(ReadBack(*store, 0, 4 * kG));  // 1 is now the oldest
  ASSERT_EQ(Put(*store, 10, 4 * kG), PutResult::kReserved);
  EXPECT_TRUE(Contains(*store, 0));
  EXPECT_FALSE(Contains(*store, 1));
  EXPECT_TRUE(Contains(*store, 2));
  EXPECT_TRUE(Contains(*store, 3));
}

TEST(BlockStore, S3FifoReadmitsRecentlyEvictedKeyToMain) {
  // A key evicted from the small queue and written again soon is admitted to the main queue, so
  // it outlives one-time blocks written after it.
  auto store = MakeStore(64 * kG, EvictionKind::kS3Fifo);
  const size_t size = 4 * kG;  // 16 blocks fit
  for (uint64_t id = 0; id < 16; ++id) ASSERT_EQ(Put(*store, id, size), PutResult::kReserved);
  ASSERT_EQ(Put(*store, 100, size), PutResult::kReserved);  // evicts 0 into the ghost table
  ASSERT_FALSE(Contains(*store, 0));
  ASSERT_EQ(Put(*store, 0, size), PutResult::kReserved);  // ghost hit: straight to main
  for (uint64_t id = 200; id < 240; ++id) ASSERT_EQ(Put(*store, id, size), PutResult::kReserved);
  EXPECT_TRUE(Contains(*store, 0));
  EXPECT_TRUE(ReadBack(*store, 0, size));
}

TEST(BlockStore, StatsCounters) {
  auto store = MakeStore(8 * kG, EvictionKind::kS3Fifo, 1.0);
  ASSERT_EQ(Put(*store, 1, 1000), PutResult::kReserved);
  ASSERT_EQ(Put(*store, 2, 3000), PutResult::kReserved);
  ASSERT_EQ(Put(*store, 1, 1000), PutResult::kExists);
  ASSERT_EQ(Put(*store, 3, 9 * kG), PutResult::kTooLarge);
  EXPECT_TRUE(ReadBack(*store, 1, 1000));
  EXPECT_TRUE(ReadBack(*store, 2, 3000));
  EXPECT_TRUE(ReadBack(*store, 1, 1000));
  EXPECT_FALSE(ReadBack(*store, 7, 1));
  EXPECT_TRUE(Delete(*store, 2));
  BlockStoreStats s = store->Stats();
  EXPECT_EQ(s.capacity_bytes, 8 * kG);
  EXPECT_EQ(s.high_watermark_bytes, 8 * kG);
  EXPECT_EQ(s.used_bytes, kG);
  EXPECT_EQ(s.entries, 1u);
  EXPECT_EQ(s.reserved_blocks, 0u);
  EXPECT_EQ(s.pinned_blocks, 0u);
  EXPECT_EQ(s.hits, 3u);
  EXPECT_EQ(s.misses, 1u);
  EXPECT_EQ(s.stored, 2u);
  EXPECT_EQ(s.existing, 1u);
  EXPECT_EQ(s.rejected, 1u);
  EXPECT_EQ(s.evictions, 0u);
  EXPECT_EQ(s.deletes, 1u);
  EXPECT_EQ(s.bytes_in, 4000u);
  EXPECT_EQ(s.bytes_out, 5000u);
  // Fill past capacity: evictions are counted.
  for (uint64_t id = 10; id < 20; ++id) ASSERT_EQ(Put(*store, id, kG), PutResult::kReserved);
  s = store->Stats();
  EXPECT_EQ(s.stored, 12u);
  EXPECT_EQ(s.entries, 8u);
  EXPECT_EQ(s.evictions, 3u);
  EXPECT_EQ(s.used_bytes, 8 * kG);
}

TEST(BlockStore, CollidingKeysInTheIndex) {
  // Keys whose low 64 bits are equal or adjacent share index slots (including the wrap-around at
  // the end of the table); insertion and backward-shift deletion must keep every one findable.
  auto store = MakeStore(64 * kG);  // 64 entries at most, 128 index slots
  std::mt19937_64 rng(11);
  const uint64_t homes[] = {125, 126, 127, 0, 1, 127 + 128};
  auto make_key = [&](uint64_t n) {
    Key128 k;
    const uint64_t low = homes[n % 6];
    std::memcpy(k.bytes.data(), &n, 8);
    std::memcpy(k.bytes.data() + 8, &low, 8);
    return k;
  };
  std::set<uint64_t> live;
  for (int step = 0; step < 20000; ++step) {
    const uint64_t n = rng() % 120;
    const Key128 key = make_key(n);
    if (rng() % 2 == 0 && live.size() < 60) {
      const PutResult r = Put(*store, key, 1, n);
      ASSERT_EQ(r, live.count(n) ? PutResult::kExists : PutResult::kReserved) << step;
      live.insert(n);
    } else {
      bool deleted[1];
      store->Delete(std::span<const Key128>(&key, 1), deleted);
      ASSERT_EQ(deleted[0], live.erase(n) == 1) << step;
    }
    if (step % 50 == 0) {
      for (uint64_t m = 0; m < 120; ++m)
        ASSERT_EQ(Contains(*store, make_key(m)), live.count(m) == 1) << m;
    }
  }
  EXPECT_EQ(store->Stats().entries, live.size());
  EXPECT_EQ(store->Stats().evictions, 0u);
}

TEST(BlockStore, ConcurrentWritersReadersAndDeleters) {
  auto store = MakeStore(512 * kG, EvictionKind::kS3Fifo, 0.9);
  std::atomic<bool> bad{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      for (int i = 0; i < 4000 && !bad.load(); ++i) {
        const uint64_t id = rng() % 400;
        const size_t size = 1 + (id * 977) % (5 * kG);
        switch (rng() % 4) {
          case 0:
          case 1: {
            const PutResult r = Put(*store, id, size);
            if (r != PutResult::kReserved && r != PutResult::kExists) bad = true;
            break;
          }
          case 2: {
            const Key128 key = KeyOf(id);
            PinnedBlock b[1];
            bool found[1];
            store->Pin(std::span<const Key128>(&key, 1), b, found);
            if (found[0]) {
              if (b[0].size != size || !HasBytes(b[0].data, b[0].size, id)) bad = true;
              store->Unpin(b);
            }
            break;
          }
          default:
            Delete(*store, id);
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_FALSE(bad.load());
  const BlockStoreStats s = store->Stats();
  EXPECT_EQ(s.reserved_blocks, 0u);
  EXPECT_EQ(s.pinned_blocks, 0u);
  EXPECT_LE(s.used_bytes, s.high_watermark_bytes);
  EXPECT_EQ(s.entries + s.evictions + s.deletes, s.stored);
}

}  // namespace
}  // namespace kvpool
