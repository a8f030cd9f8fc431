// Where new blocks go: weighted rendezvous (highest-random-weight) hashing over live nodes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "kvpool/hashing.h"
#include "kvpool/status.h"

namespace kvpool {

/// A node as placement sees it: a stable seed (hash of its id) and a weight (its capacity).
struct PlacementNode {
  uint64_t seed;
  double weight;
};

/// Seed for a node id: the low 64 bits of XXH3-128 of the id's bytes.
uint64_t PlacementSeed(std::span<const uint8_t> node_id);

/// Indices of the `k` nodes ranked highest for `key` (best first). Each node scores
/// weight / -ln(u) with u uniform in (0, 1) from XXH3-64(key, seed); so a node receives a share
/// of keys proportional to its weight, and adding or removing a node moves only the keys it gains
/// or held. Deterministic across processes and machines.
std::vector<uint32_t> RankNodes(const Key128& key, std::span<const PlacementNode> nodes, size_t k);

/// Placement over one member view: the nodes' seeds are hashed once, when the view is built.
class Placement {
 public:
  /// InvalidArgument when the lengths differ or a weight is not positive and finite.
  static Result<Placement> Create(std::span<const std::string> node_ids,
                                  std::span<const double> weights);
  /// RankNodes for each key: out[i] holds the indices of key i's `k` best nodes.
  std::vector<std::vector<uint32_t>> Rank(std::span<const Key128> keys, size_t k) const;
  size_t size() const { return nodes_.size(); }

 private:
  explicit Placement(std::vector<PlacementNode> nodes) : nodes_(std::move(nodes)) {}
  std::vector<PlacementNode> nodes_;
};

}  // namespace kvpool
