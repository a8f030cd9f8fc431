// libibverbs, loaded at run time (dlopen of libibverbs.so.1) so that kvpool imports and serves TCP
// and shared memory on machines without rdma-core. Compiled against the rdma-core headers when
// the build found them (KVPOOL_HAVE_IBVERBS); otherwise every probe says so.
#pragma once

#include <string>
#include <vector>

namespace kvpool::rdma {

struct VerbsProbe {
  bool built = false;                ///< compiled with the rdma-core headers
  bool library = false;              ///< libibverbs.so.1 loaded
  std::vector<std::string> devices;  ///< devices libibverbs lists (and could open)
  std::string reason;                ///< why there is no usable device, or "" when there is
};

/// Loads libibverbs once (later calls reuse it) and lists the devices it can open. Never throws,
/// never aborts: every failure is a reason.
VerbsProbe ProbeVerbs();

}  // namespace kvpool::rdma
