// Copy plans: a gather or scatter of KV blocks as a list of contiguous copies. The CPU engine
// runs a plan with memcpy and the CUDA engine submits the same plan to the device, so the plan
// for every layout is tested byte for byte where there is no GPU.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "kvpool/copy_engine.h"

namespace kvpool {

/// One contiguous copy of `bytes` from `src` to `dst`.
struct CopyRun {
  uint64_t src = 0;
  uint64_t dst = 0;
  uint64_t bytes = 0;
};

enum class CopyDirection : uint8_t { kGather, kScatter };  ///< cache -> staging, staging -> cache

/// Appends to `out` the copies that move `block_ids[i]`'s regions, in region order, to or from
/// `staging + i * object_bytes` (object_bytes = the regions' bytes summed). A run that continues
/// the previous one on both sides is merged into it, so consecutive blocks of a packed region,
/// or the regions of one block that lie back to back (a layout whose layers are contiguous per
/// block), become one copy. The caller has checked the ids (CopyEngine::CheckCall).
void PlanCopies(std::span<const KVRegion> regions, std::span<const uint32_t> block_ids,
                uint64_t staging, CopyDirection direction, std::vector<CopyRun>* out);

/// Bytes moved by `runs`.
uint64_t PlanBytes(std::span<const CopyRun> runs);

}  // namespace kvpool
