#include "kvpool/placement.h"

#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

namespace kvpool {
namespace {

Key128 KeyOf(uint64_t i) { return Hash128(&i, sizeof i); }

PlacementNode Node(const std::string& id, double weight) {
  return {PlacementSeed({reinterpret_cast<const uint8_t*>(id.data()), id.size()}), weight};
}

TEST(Placement, SharesFollowWeights) {
  const std::vector<PlacementNode> nodes = {Node("a", 1), Node("b", 2), Node("c", 1)};
  std::map<uint32_t, int> count;
  constexpr int kKeys = 40000;
  for (int i = 0; i < kKeys; ++i) ++count[RankNodes(KeyOf(i), nodes, 1)[0]];
  EXPECT_NEAR(count[0] / double(kKeys), 0.25, 0.02);
  EXPECT_NEAR(count[1] / double(kKeys), 0.50, 0.02);
  EXPECT_NEAR(count[2] / double(kKeys), 0.25, 0.02);
}

TEST(Placement, AddingANodeMovesOnlyKeysItGains) {
  std::vector<PlacementNode> nodes = {Node("a", 1), Node("b", 1), Node("c", 1)};
  std::vector<uint32_t> before;
  for (int i = 0; i < 10000; ++i) before.push_back(RankNodes(KeyOf(i), nodes, 1)[0]);
  nodes.push_back(Node("d", 1));
  int moved = 0;
  for (int i = 0; i < 10000; ++i) {
    const uint32_t now = RankNodes(KeyOf(i), nodes, 1)[0];
    if (now != before[i]) {
      EXPECT_EQ(now, 3u) << "key " << i << " moved between old nodes";
      ++moved;
    }
  }
  EXPECT_NEAR(moved / 10000.0, 0.25, 0.03);
}

TEST(Placement, RanksAreDistinctDeterministicAndBounded) {
  const std::vector<PlacementNode> nodes = {Node("a", 1), Node("b", 1), Node("c", 1)};
  const auto r = RankNodes(KeyOf(7), nodes, 2);
  ASSERT_EQ(r.size(), 2u);
  EXPECT_NE(r[0], r[1]);
  EXPECT_EQ(r, RankNodes(KeyOf(7), nodes, 2));
  EXPECT_EQ(RankNodes(KeyOf(7), nodes, 10).size(), 3u);
  EXPECT_TRUE(RankNodes(KeyOf(7), {}, 1).empty());
}

TEST(Placement, OneViewRanksAsRankNodesDoes) {
  const std::vector<std::string> ids = {"a", "b", "c"};
  const std::vector<double> weights = {1, 2, 1};
  const auto placement = Placement::Create(ids, weights);
  ASSERT_TRUE(placement.ok());
  EXPECT_EQ(placement.value().size(), 3u);
  std::vector<Key128> keys;
  for (uint64_t i = 0; i < 200; ++i) keys.push_back(KeyOf(i));
  const auto ranks = placement.value().Rank(keys, 2);
  ASSERT_EQ(ranks.size(), keys.size());
  const std::vector<PlacementNode> nodes = {Node("a", 1), Node("b", 2), Node("c", 1)};
  for (size_t i = 0; i < keys.size(); ++i) EXPECT_EQ(ranks[i], RankNodes(keys[i], nodes, 2));
}

TEST(Placement, CreateRejectsMismatchedOrNonPositiveWeights) {
  const std::vector<std::string> ids = {"a", "b"};
  const auto short_weights = Placement::Create(ids, std::vector<double>{1});
  ASSERT_FALSE(short_weights.ok());
  EXPECT_EQ(short_weights.status().code(), ErrorCode::kInvalidArgument);
  const auto zero = Placement::Create(ids, std::vector<double>{1, 0});
  ASSERT_FALSE(zero.ok());
  EXPECT_NE(zero.status().message().find("'b'"), std::string::npos);
  EXPECT_TRUE(Placement::Create({}, {}).ok());  // an empty view places nothing
}

}  // namespace
}  // namespace kvpool
