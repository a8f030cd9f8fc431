#include "kvpool/placement.h"

#include <algorithm>
#include <cmath>

#define XXH_INLINE_ALL
#include <xxhash.h>

namespace kvpool {

uint64_t PlacementSeed(std::span<const uint8_t> node_id) {
  return Hash128(node_id.data(), node_id.size()).Low64();
}

std::vector<uint32_t> RankNodes(const Key128& key, std::span<const PlacementNode> nodes, size_t k) {
  std::vector<std::pair<double, uint32_t>> scored;
  scored.reserve(nodes.size());
  for (uint32_t i = 0; i < nodes.size(); ++i) {
    const uint64_t h = XXH3_64bits_withSeed(key.bytes.data(), key.bytes.size(), nodes[i].seed);
    // 53 random bits, offset by half a step so u is never 0 or 1.
    const double u = (static_cast<double>(h >> 11) + 0.5) * 0x1.0p-53;
    scored.emplace_back(nodes[i].weight / -std::log(u), i);
  }
  k = std::min(k, scored.size());
  std::partial_sort(scored.begin(), scored.begin() + static_cast<std::ptrdiff_t>(k), scored.end(),
                    [](const auto& a, const auto& b) { return a.first > b.first; });
  std::vector<uint32_t> out(k);
  for (size_t i = 0; i < k; ++i) out[i] = scored[i].second;
  return out;
}

Result<Placement> Placement::Create(std::span<const std::string> node_ids,
                                    std::span<const double> weights) {
  if (node_ids.size() != weights.size()) {
    return Status(ErrorCode::kInvalidArgument, std::to_string(node_ids.size()) + " node ids but " +
                                                   std::to_string(weights.size()) + " weights");
  }
  std::vector<PlacementNode> nodes;
  nodes.reserve(node_ids.size());
  for (size_t i = 0; i < node_ids.size(); ++i) {
    if (!(weights[i] > 0.0 && std::isfinite(weights[i]))) {
      return Status(ErrorCode::kInvalidArgument, "weight of node '" + node_ids[i] + "' is " +
                                                     std::to_string(weights[i]) +
                                                     ", not a positive number");
    }
    const auto* p = reinterpret_cast<const uint8_t*>(node_ids[i].data());
    nodes.push_back({PlacementSeed({p, node_ids[i].size()}), weights[i]});
  }
  return Placement(std::move(nodes));
}

std::vector<std::vector<uint32_t>> Placement::Rank(std::span<const Key128> keys, size_t k) const {
  std::vector<std::vector<uint32_t>> out;
  out.reserve(keys.size());
  for (const Key128& key : keys) out.push_back(RankNodes(key, nodes_, k));
  return out;
}

}  // namespace kvpool
