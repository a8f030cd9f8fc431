#include "transport/rdma/ibverbs.h"

#if KVPOOL_HAVE_IBVERBS
#include <dlfcn.h>
#include <infiniband/verbs.h>

#include <cstring>
#include <mutex>
#endif

namespace kvpool::rdma {

#if KVPOOL_HAVE_IBVERBS
namespace {

/// The exported libibverbs entry points the probe needs (the data path's calls are inline
/// wrappers over the context's ops table and need no symbol).
struct Library {
  void* handle = nullptr;
  std::string error;
  decltype(&ibv_get_device_list) get_device_list = nullptr;
  decltype(&ibv_free_device_list) free_device_list = nullptr;
  decltype(&ibv_get_device_name) get_device_name = nullptr;
  decltype(&ibv_open_device) open_device = nullptr;
  decltype(&ibv_close_device) close_device = nullptr;
};

const Library& Load() {
  static Library lib;
  static std::once_flag once;
  std::call_once(once, [] {
    lib.handle = dlopen("libibverbs.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib.handle == nullptr) {
      const char* e = dlerror();
      lib.error = std::string("libibverbs.so.1 not loadable (apt-get install libibverbs1): ") +
                  (e != nullptr ? e : "unknown error");
      return;
    }
    auto sym = [&](const char* name) { return dlsym(lib.handle, name); };
    lib.get_device_list =
        reinterpret_cast<decltype(lib.get_device_list)>(sym("ibv_get_device_list"));
    lib.free_device_list =
        reinterpret_cast<decltype(lib.free_device_list)>(sym("ibv_free_device_list"));
    lib.get_device_name =
        reinterpret_cast<decltype(lib.get_device_name)>(sym("ibv_get_device_name"));
    lib.open_device = reinterpret_cast<decltype(lib.open_device)>(sym("ibv_open_device"));
    lib.close_device = reinterpret_cast<decltype(lib.close_device)>(sym("ibv_close_device"));
    if (!lib.get_device_list || !lib.free_device_list || !lib.get_device_name || !lib.open_device ||
        !lib.close_device) {
      lib.error = "libibverbs.so.1 lacks the verbs entry points (too old an rdma-core?)";
      lib.handle = nullptr;
    }
  });
  return lib;
}

}  // namespace
#endif

VerbsProbe ProbeVerbs() {
  VerbsProbe probe;
#if KVPOOL_HAVE_IBVERBS
  probe.built = true;
  const Library& lib = Load();
  if (lib.handle == nullptr) {
    probe.reason = lib.error;
    return probe;
  }
  probe.library = true;
  int n = 0;
  ibv_device** list = lib.get_device_list(&n);
  if (list == nullptr) {
    // ENOSYS: the kernel has no RDMA support (no uverbs) — the same answer as an empty list.
    probe.reason = std::string("no RDMA devices on this machine (ibv_get_device_list: ") +
                   std::strerror(errno) + ")";
    return probe;
  }
  std::string unopened;
  for (int i = 0; i < n; ++i) {
    const char* name = lib.get_device_name(list[i]);
    ibv_context* ctx = lib.open_device(list[i]);
    if (ctx == nullptr) {
      unopened += std::string(unopened.empty() ? "" : ", ") + (name ? name : "?") + " (" +
                  std::strerror(errno) + ")";
      continue;
    }
    lib.close_device(ctx);
    probe.devices.emplace_back(name != nullptr ? name : "");
  }
  lib.free_device_list(list);
  if (probe.devices.empty()) {
    probe.reason = unopened.empty() ? "no RDMA devices on this machine"
                                    : "no RDMA device could be opened: " + unopened;
  }
#else
  probe.reason =
      "kvpool was built without the rdma-core headers (apt-get install libibverbs-dev, "
      "then rebuild)";
#endif
  return probe;
}

}  // namespace kvpool::rdma
