#include "kvpool/copy_engine.h"

#include <gtest/gtest.h>

#include <cstring>
#include <numeric>
#include <vector>

namespace kvpool {
namespace {

// A cache shaped like vLLM's per-layer [2, num_blocks, heads * block_size * head_size] tensors:
// `layers` layers, each a K plane and a V plane, block b of plane p holding `block_bytes` bytes.
struct FakeCache {
  FakeCache(int layers, uint32_t blocks, uint64_t block_bytes)
      : num_blocks(blocks), bytes(block_bytes) {
    planes.resize(2 * layers, std::vector<uint8_t>(blocks * block_bytes));
    for (size_t p = 0; p < planes.size(); ++p) {
      for (size_t i = 0; i < planes[p].size(); ++i)
        planes[p][i] = static_cast<uint8_t>(i * 7 + p * 31 + i / 251);
    }
  }
  std::vector<KVRegion> Regions() {
    std::vector<KVRegion> out;
    for (auto& p : planes)
      out.push_back({reinterpret_cast<uint64_t>(p.data()), bytes, bytes, num_blocks});
    return out;
  }
  // What block b's stored object must be: its bytes of every plane, in plane order.
  std::vector<uint8_t> Object(uint32_t b) const {
    std::vector<uint8_t> out;
    for (const auto& p : planes)
      out.insert(out.end(), p.begin() + b * bytes, p.begin() + (b + 1) * bytes);
    return out;
  }
  uint32_t num_blocks;
  uint64_t bytes;
  std::vector<std::vector<uint8_t>> planes;
};

std::unique_ptr<CopyEngine> Make(std::vector<KVRegion> regions, unsigned threads = 1,
                                 uint64_t parallel = 8 << 20) {
  auto r = MakeCpuCopyEngine(std::move(regions), threads, parallel);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return std::move(r.value());
}

TEST(CopyEngine, GatherConcatenatesRegionsPerBlockInCallOrder) {
  FakeCache cache(3, 16, 96);
  auto engine = Make(cache.Regions());
  EXPECT_EQ(engine->object_bytes(), 6u * 96);
  EXPECT_EQ(engine->num_blocks(), 16u);
  EXPECT_STREQ(engine->device(), "cpu");
  const std::vector<uint32_t> ids = {9, 0, 15, 3};
  std::vector<uint8_t> staging(ids.size() * engine->object_bytes());
  ASSERT_TRUE(engine->Gather(ids, staging).ok());
  for (size_t i = 0; i < ids.size(); ++i) {
    const auto want = cache.Object(ids[i]);
    EXPECT_EQ(0, std::memcmp(staging.data() + i * want.size(), want.data(), want.size()))
        << "object " << i;
  }
}

TEST(CopyEngine, ScatterWritesOnlyTheNamedBlocks) {
  FakeCache source(2, 8, 64);
  FakeCache target(2, 8, 64);
  for (auto& p : target.planes) std::fill(p.begin(), p.end(), 0xEE);
  auto from = Make(source.Regions());
  auto to = Make(target.Regions());
  const std::vector<uint32_t> src_ids = {1, 6};
  const std::vector<uint32_t> dst_ids = {4, 2};
  std::vector<uint8_t> staging(2 * from->object_bytes());
  ASSERT_TRUE(from->Gather(src_ids, staging).ok());
  ASSERT_TRUE(to->Scatter(dst_ids, staging).ok());
  for (uint32_t b = 0; b < 8; ++b) {
    const auto got = target.Object(b);
    if (b == 4 || b == 2) {
      EXPECT_EQ(got, source.Object(b == 4 ? 1 : 6)) << "block " << b;
    } else {
      EXPECT_EQ(got, std::vector<uint8_t>(got.size(), 0xEE)) << "block " << b << " was touched";
    }
  }
}

TEST(CopyEngine, InterleavedRegionsAndOneBlockPerRow) {
  // [num_blocks, 2, n] layout: one region whose stride covers K and V of a block.
  std::vector<uint8_t> cache(10 * 2 * 40);
  std::iota(cache.begin(), cache.end(), 0);
  auto engine = Make({{reinterpret_cast<uint64_t>(cache.data()), 80, 80, 10}});
  std::vector<uint8_t> staging(80);
  ASSERT_TRUE(engine->Gather(std::vector<uint32_t>{7}, staging).ok());
  EXPECT_EQ(0, std::memcmp(staging.data(), cache.data() + 7 * 80, 80));
  // Half of each row only (a region narrower than its stride).
  auto k_only = Make({{reinterpret_cast<uint64_t>(cache.data()), 80, 40, 10}});
  std::vector<uint8_t> half(40);
  ASSERT_TRUE(k_only->Gather(std::vector<uint32_t>{2}, half).ok());
  EXPECT_EQ(0, std::memcmp(half.data(), cache.data() + 2 * 80, 40));
}

TEST(CopyEngine, ThreadedCopiesMatchSingleThreaded) {
  FakeCache cache(4, 64, 1000);
  auto serial = Make(cache.Regions(), 1);
  auto threaded = Make(cache.Regions(), 3, 0);  // parallel from the first byte
  std::vector<uint32_t> ids(61);
  std::iota(ids.begin(), ids.end(), 2);
  std::vector<uint8_t> a(ids.size() * serial->object_bytes()), b(a.size());
  ASSERT_TRUE(serial->Gather(ids, a).ok());
  ASSERT_TRUE(threaded->Gather(ids, b).ok());
  EXPECT_EQ(a, b);
  FakeCache target(4, 64, 1000);
  for (auto& p : target.planes) std::fill(p.begin(), p.end(), 0);
  auto back = Make(target.Regions(), 3, 0);
  ASSERT_TRUE(back->Scatter(ids, b).ok());
  for (uint32_t id : ids) EXPECT_EQ(target.Object(id), cache.Object(id)) << "block " << id;
}

TEST(CopyEngine, BadCallsNameTheValueAndCopyNothing) {
  FakeCache cache(1, 4, 32);
  const auto before = cache.planes;
  auto engine = Make(cache.Regions());
  std::vector<uint8_t> staging(3 * engine->object_bytes(), 0x11);

  Status s = engine->Scatter(std::vector<uint32_t>{0, 4}, staging);
  EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(s.message().find("block id 4"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("[0, 4)"), std::string::npos) << s.message();

  s = engine->Scatter(std::vector<uint32_t>{1, 2, 1}, staging);
  EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(s.message().find("block id 1 appears more than once"), std::string::npos)
      << s.message();

  s = engine->Scatter(std::vector<uint32_t>{0, 1, 2, 3}, staging);
  EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(s.message().find("staging holds 192 bytes"), std::string::npos) << s.message();

  s = engine->Gather(std::vector<uint32_t>{0, 1, 2, 3}, staging);
  EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(cache.planes, before);

  // Gathering the same block twice is fine (it only reads).
  EXPECT_TRUE(engine->Gather(std::vector<uint32_t>{2, 2}, staging).ok());
  EXPECT_TRUE(engine->Gather(std::vector<uint32_t>{}, std::span<uint8_t>()).ok());
}

TEST(CopyEngine, TicketsAreWaitedForOnceAndBadStartsIssueNone) {
  FakeCache cache(2, 8, 64);
  auto engine = Make(cache.Regions());
  std::vector<uint8_t> a(2 * engine->object_bytes()), b(a.size());
  auto first = engine->StartGather(std::vector<uint32_t>{1, 6}, a);
  auto second = engine->StartGather(std::vector<uint32_t>{6, 1}, b);
  ASSERT_TRUE(first.ok() && second.ok());
  EXPECT_NE(first.value(), second.value());
  ASSERT_TRUE(engine->Wait(second.value()).ok());  // any order
  ASSERT_TRUE(engine->Wait(first.value()).ok());
  EXPECT_EQ(std::vector<uint8_t>(a.begin(), a.begin() + engine->object_bytes()), cache.Object(1));
  EXPECT_EQ(std::vector<uint8_t>(b.begin(), b.begin() + engine->object_bytes()), cache.Object(6));

  Status again = engine->Wait(first.value());
  EXPECT_EQ(again.code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(again.message().find("copy ticket " + std::to_string(first.value())), std::string::npos)
      << again.message();
  EXPECT_EQ(engine->Wait(12345).code(), ErrorCode::kInvalidArgument);

  auto bad = engine->StartScatter(std::vector<uint32_t>{3, 3}, a);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), ErrorCode::kInvalidArgument);
  auto next = engine->StartScatter(std::vector<uint32_t>{3, 4}, a);
  ASSERT_TRUE(next.ok());
  EXPECT_EQ(next.value(), second.value() + 1);  // the refused start took no ticket
  EXPECT_TRUE(engine->Wait(next.value()).ok());
  EXPECT_EQ(cache.Object(3), cache.Object(1));  // a held blocks 1 and 6
  EXPECT_EQ(cache.Object(4), cache.Object(6));
}

TEST(CopyEngine, RegionsAreValidated) {
  uint8_t buf[64];
  const auto base = reinterpret_cast<uint64_t>(buf);
  auto fails = [](std::vector<KVRegion> regions, const char* what) {
    auto r = MakeCpuCopyEngine(std::move(regions));
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find(what), std::string::npos) << r.status().message();
  };
  fails({}, "at least one KV region");
  fails({{base, 16, 16, 4}, {0, 16, 16, 4}}, "KV region 1 has a null base");
  fails({{base, 16, 0, 4}}, "bytes = 0");
  fails({{base, 16, 16, 0}}, "num_blocks = 0");
  fails({{base, 16, 32, 2}}, "bytes = 32 exceed stride = 16");
  EXPECT_TRUE(MakeCpuCopyEngine({{base, 0, 64, 1}}).ok());  // one block: stride unused
  // Regions with different block counts: the engine accepts the smallest.
  auto r = MakeCpuCopyEngine({{base, 8, 8, 8}, {base, 4, 4, 3}});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r.value()->num_blocks(), 3u);
}

}  // namespace
}  // namespace kvpool
