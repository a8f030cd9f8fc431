// libibverbs, loaded at run time (dlopen of libibverbs.so.1): the probe, and the provider behind
// verbs.h. kvpool imports and serves TCP and shared memory on machines without rdma-core.
// Compiled against the rdma-core headers when the build found them (KVPOOL_HAVE_IBVERBS);
// otherwise every probe and open says so.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "transport/rdma/devices.h"
#include "transport/rdma/verbs.h"

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

/// The libibverbs provider: opens `selection`'s device, checks its port is ACTIVE, reads the
/// chosen GID and allocates a protection domain. Unsupported naming why when libibverbs or the
/// device cannot be used (the caller falls back to TCP).
Result<std::unique_ptr<Device>> OpenVerbsDevice(const Selection& selection);

}  // namespace kvpool::rdma
