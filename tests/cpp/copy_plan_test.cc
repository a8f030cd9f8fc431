#include "kvpool/copy_plan.h"

#include <gtest/gtest.h>

#include <vector>

namespace kvpool {
namespace {

std::vector<CopyRun> Plan(const std::vector<KVRegion>& regions, const std::vector<uint32_t>& ids,
                          CopyDirection d = CopyDirection::kGather, uint64_t staging = 1 << 20) {
  std::vector<CopyRun> out;
  PlanCopies(regions, ids, staging, d, &out);
  return out;
}

bool Same(const CopyRun& a, const CopyRun& b) {
  return a.src == b.src && a.dst == b.dst && a.bytes == b.bytes;
}

TEST(CopyPlan, SeparateKAndVPlanesGiveOneRunPerBlockAndPlane) {
  // [2, num_blocks, ...]: K plane at 0x10000, V plane at 0x20000, 256-byte blocks.
  const std::vector<KVRegion> regions = {{0x10000, 256, 256, 64}, {0x20000, 256, 256, 64}};
  const auto runs = Plan(regions, {3, 9});
  ASSERT_EQ(runs.size(), 4u);
  EXPECT_TRUE(Same(runs[0], {0x10000 + 3 * 256, 1 << 20, 256}));
  EXPECT_TRUE(Same(runs[1], {0x20000 + 3 * 256, (1 << 20) + 256, 256}));
  EXPECT_TRUE(Same(runs[2], {0x10000 + 9 * 256, (1 << 20) + 512, 256}));
  EXPECT_TRUE(Same(runs[3], {0x20000 + 9 * 256, (1 << 20) + 768, 256}));
  EXPECT_EQ(PlanBytes(runs), 4u * 256);
}

TEST(CopyPlan, ConsecutiveBlocksOfOnePackedRegionMerge) {
  // [num_blocks, 2, ...] (K and V of a block together) or MLA's [num_blocks, ...]: one region.
  const std::vector<KVRegion> regions = {{0x10000, 512, 512, 64}};
  const auto runs = Plan(regions, {4, 5, 6, 9, 10, 2});
  ASSERT_EQ(runs.size(), 3u);
  EXPECT_TRUE(Same(runs[0], {0x10000 + 4 * 512, 1 << 20, 3 * 512}));
  EXPECT_TRUE(Same(runs[1], {0x10000 + 9 * 512, (1 << 20) + 3 * 512, 2 * 512}));
  EXPECT_TRUE(Same(runs[2], {0x10000 + 2 * 512, (1 << 20) + 5 * 512, 512}));
}

TEST(CopyPlan, LayersContiguousPerBlockMergeIntoOneRunPerBlock) {
  // One cross-layer cache [num_blocks, layers, ...]: layer l of block b at b * 4096 + l * 1024.
  std::vector<KVRegion> regions;
  for (uint64_t l = 0; l < 4; ++l) regions.push_back({0x100000 + l * 1024, 4096, 1024, 16});
  const auto runs = Plan(regions, {7, 2}, CopyDirection::kScatter);
  ASSERT_EQ(runs.size(), 2u);
  EXPECT_TRUE(Same(runs[0], {1 << 20, 0x100000 + 7 * 4096, 4096}));
  EXPECT_TRUE(Same(runs[1], {(1 << 20) + 4096, 0x100000 + 2 * 4096, 4096}));
}

TEST(CopyPlan, RepeatedBlocksInAGatherAreCopiedEachTime) {
  const std::vector<KVRegion> regions = {{0x10000, 512, 512, 64}};
  const auto runs = Plan(regions, {5, 5});
  ASSERT_EQ(runs.size(), 2u);  // the second copy does not continue the first in the cache
  EXPECT_EQ(runs[1].src, runs[0].src);
  EXPECT_EQ(runs[1].dst, runs[0].dst + 512);
}

TEST(CopyPlan, AnEmptyCallPlansNothing) {
  EXPECT_TRUE(Plan({{0x10000, 512, 512, 64}}, {}).empty());
}

}  // namespace
}  // namespace kvpool
