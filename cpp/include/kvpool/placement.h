// Where new blocks go: weighted rendezvous (highest-random-weight) hashing over live nodes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "kvpool/hashing.h"

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

}  // namespace kvpool
