#include "kvpool/copy_plan.h"

namespace kvpool {

void PlanCopies(std::span<const KVRegion> regions, std::span<const uint32_t> block_ids,
                uint64_t staging, CopyDirection direction, std::vector<CopyRun>* out) {
  const bool gather = direction == CopyDirection::kGather;
  uint64_t at = staging;
  for (const uint32_t id : block_ids) {
    for (const KVRegion& g : regions) {
      const uint64_t cache = g.base + uint64_t{id} * g.stride;
      const CopyRun run = gather ? CopyRun{cache, at, g.bytes} : CopyRun{at, cache, g.bytes};
      at += g.bytes;
      if (!out->empty()) {
        CopyRun& last = out->back();
        if (last.src + last.bytes == run.src && last.dst + last.bytes == run.dst) {
          last.bytes += run.bytes;
          continue;
        }
      }
      out->push_back(run);
    }
  }
}

uint64_t PlanBytes(std::span<const CopyRun> runs) {
  uint64_t total = 0;
  for (const CopyRun& r : runs) total += r.bytes;
  return total;
}

}  // namespace kvpool
