// The CUDA entry points of a build without the CUDA runtime's headers: nothing is available.
#include "kvpool/copy_engine.h"

namespace kvpool {

namespace {
Status NotBuilt() {
  return Status(ErrorCode::kUnsupported,
                "kvpool was built without the CUDA copy engine (no cuda_runtime_api.h found; "
                "rebuild with the CUDA toolkit, or set KVPOOL_CUDA_INCLUDE_DIR)");
}
}  // namespace

bool CudaBuilt() { return false; }
Status CudaAvailable() { return NotBuilt(); }
Status CudaHostRegister(uint64_t, uint64_t) { return NotBuilt(); }
Status CudaHostUnregister(uint64_t) { return NotBuilt(); }
Result<std::unique_ptr<CopyEngine>> MakeCudaCopyEngine(std::vector<KVRegion> regions, int) {
  if (Status s = ValidateRegions(regions); !s.ok()) return s;
  return NotBuilt();
}

}  // namespace kvpool
