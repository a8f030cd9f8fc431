// The CUDA copy engine: KV blocks between vLLM's device KV tensors and host staging memory.
//
// Built when the CUDA runtime's headers are found (KVPOOL_HAVE_CUDA); the runtime itself,
// libcudart.so.13, is loaded at first use with dlopen (the copy torch already loaded, when it
// did), so the extension imports and every CPU path works on a machine without CUDA, a driver or
// a GPU: there the engine is "unavailable" with the reason. A call plans its copies exactly as
// the CPU engine does (copy_plan.h) and submits the runs with one cudaMemcpyBatchAsync (or one
// cudaMemcpyAsync per run where the runtime has no batch call) on the engine's own stream, after
// an event recorded on the caller's compute stream, then records the ticket's event; Wait waits
// for that event only: never a device-wide synchronise.
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "kvpool/copy_engine.h"
#include "kvpool/copy_plan.h"

namespace kvpool {
namespace {

/// The runtime entry points kvpool uses, resolved once.
struct CudaRuntime {
  std::string unavailable;  ///< empty: loaded
  int version = 0;          ///< cudaRuntimeGetVersion, e.g. 13000
  decltype(&cudaGetErrorString) GetErrorString = nullptr;
  decltype(&cudaGetDeviceCount) GetDeviceCount = nullptr;
  decltype(&cudaGetDevice) GetDevice = nullptr;
  decltype(&cudaSetDevice) SetDevice = nullptr;
  decltype(&cudaStreamCreateWithFlags) StreamCreateWithFlags = nullptr;
  decltype(&cudaStreamDestroy) StreamDestroy = nullptr;
  decltype(&cudaStreamSynchronize) StreamSynchronize = nullptr;
  decltype(&cudaStreamWaitEvent) StreamWaitEvent = nullptr;
  decltype(&cudaEventCreateWithFlags) EventCreateWithFlags = nullptr;
  decltype(&cudaEventRecord) EventRecord = nullptr;
  decltype(&cudaEventDestroy) EventDestroy = nullptr;
  decltype(&cudaEventSynchronize) EventSynchronize = nullptr;
  decltype(&cudaMemcpyAsync) MemcpyAsync = nullptr;
  decltype(&cudaMemcpyBatchAsync) MemcpyBatchAsync = nullptr;  ///< null: one call per run
  decltype(&cudaHostRegister) HostRegister = nullptr;
  decltype(&cudaHostUnregister) HostUnregister = nullptr;
  decltype(&cudaPointerGetAttributes) PointerGetAttributes = nullptr;
};

template <typename Fn>
bool Resolve(void* lib, const char* name, Fn* out) {
  *out = reinterpret_cast<Fn>(dlsym(lib, name));
  return *out != nullptr;
}

CudaRuntime LoadRuntime() {
  CudaRuntime rt;
  void* lib = nullptr;
  for (const char* name : {"libcudart.so.13", "libcudart.so"}) {
    lib = dlopen(name, RTLD_NOW | RTLD_GLOBAL);
    if (lib != nullptr) break;
  }
  if (lib == nullptr) {
    const char* why = dlerror();
    rt.unavailable = std::string("the CUDA runtime (libcudart.so.13) does not load: ") +
                     (why != nullptr ? why : "not found");
    return rt;
  }
  bool ok = Resolve(lib, "cudaGetErrorString", &rt.GetErrorString) &&
            Resolve(lib, "cudaGetDeviceCount", &rt.GetDeviceCount) &&
            Resolve(lib, "cudaGetDevice", &rt.GetDevice) &&
            Resolve(lib, "cudaSetDevice", &rt.SetDevice) &&
            Resolve(lib, "cudaStreamCreateWithFlags", &rt.StreamCreateWithFlags) &&
            Resolve(lib, "cudaStreamDestroy", &rt.StreamDestroy) &&
            Resolve(lib, "cudaStreamSynchronize", &rt.StreamSynchronize) &&
            Resolve(lib, "cudaStreamWaitEvent", &rt.StreamWaitEvent) &&
            Resolve(lib, "cudaEventCreateWithFlags", &rt.EventCreateWithFlags) &&
            Resolve(lib, "cudaEventRecord", &rt.EventRecord) &&
            Resolve(lib, "cudaEventDestroy", &rt.EventDestroy) &&
            Resolve(lib, "cudaEventSynchronize", &rt.EventSynchronize) &&
            Resolve(lib, "cudaMemcpyAsync", &rt.MemcpyAsync) &&
            Resolve(lib, "cudaHostRegister", &rt.HostRegister) &&
            Resolve(lib, "cudaHostUnregister", &rt.HostUnregister) &&
            Resolve(lib, "cudaPointerGetAttributes", &rt.PointerGetAttributes);
  decltype(&cudaRuntimeGetVersion) get_version = nullptr;
  ok = ok && Resolve(lib, "cudaRuntimeGetVersion", &get_version);
  if (!ok) {
    rt.unavailable =
        "the CUDA runtime lacks an entry point kvpool needs (a runtime older than 12?)";
    return rt;
  }
  get_version(&rt.version);
  // The batch call has this signature from CUDA 13 on (12.8's had a failIdx argument).
  if (rt.version >= 13000) Resolve(lib, "cudaMemcpyBatchAsync", &rt.MemcpyBatchAsync);
  return rt;
}

/// The runtime, loaded at first use (null, with the reason in `why`, while it does not load). A
/// failed load is tried again at the next use: the process may load libcudart later (importing
/// torch does), and dlopen then finds it by its soname.
const CudaRuntime* LoadedRuntime(std::string* why) {
  static std::mutex mu;
  static const CudaRuntime* loaded = nullptr;  // never freed: engines may outlive any scope
  std::lock_guard<std::mutex> lock(mu);
  if (loaded == nullptr) {
    CudaRuntime rt = LoadRuntime();
    if (!rt.unavailable.empty()) {
      *why = rt.unavailable;
      return nullptr;
    }
    loaded = new CudaRuntime(std::move(rt));
  }
  return loaded;
}

/// Only once CudaAvailable() succeeded (every engine and every call after it).
const CudaRuntime& Runtime() {
  std::string why;
  return *LoadedRuntime(&why);
}

Status CudaError(const char* what, cudaError_t e) {
  return Status(ErrorCode::kInternal, std::string(what) + ": " + Runtime().GetErrorString(e) +
                                          " (" + std::to_string(static_cast<int>(e)) + ")");
}

class CudaCopyEngine final : public CopyEngine {
 public:
  CudaCopyEngine(std::vector<KVRegion> regions, int device, cudaStream_t stream, cudaEvent_t ready)
      : CopyEngine(std::move(regions)), device_(device), stream_(stream), ready_(ready) {}
  ~CudaCopyEngine() override {
    const CudaRuntime& rt = Runtime();
    rt.StreamSynchronize(stream_);  // nothing may still copy into memory the caller frees next
    for (const auto& [ticket, event] : in_flight_) {
      if (event != nullptr) rt.EventDestroy(event);
    }
    for (cudaEvent_t event : free_events_) rt.EventDestroy(event);
    rt.EventDestroy(ready_);
    rt.StreamDestroy(stream_);
  }

  const char* device() const override { return "cuda"; }

  void SetComputeStream(uint64_t stream) override {
    std::lock_guard<std::mutex> lock(mu_);
    compute_stream_ = reinterpret_cast<cudaStream_t>(stream);
  }

  Result<CopyTicket> StartGather(std::span<const uint32_t> block_ids,
                                 std::span<uint8_t> staging) override {
    if (Status s = CheckCall("gather", block_ids, staging.size(), false); !s.ok()) return s;
    return Start(block_ids, reinterpret_cast<uint64_t>(staging.data()), CopyDirection::kGather);
  }

  Result<CopyTicket> StartScatter(std::span<const uint32_t> block_ids,
                                  std::span<const uint8_t> staging) override {
    if (Status s = CheckCall("scatter", block_ids, staging.size(), true); !s.ok()) return s;
    return Start(block_ids, reinterpret_cast<uint64_t>(staging.data()), CopyDirection::kScatter);
  }

  Status Wait(CopyTicket ticket) override {
    cudaEvent_t event;
    {
      std::lock_guard<std::mutex> lock(mu_);
      const auto it = in_flight_.find(ticket);
      if (it == in_flight_.end()) return UnknownTicket(ticket);
      event = it->second;
      in_flight_.erase(it);
    }
    if (event == nullptr) return Status::Ok();  // nothing to copy
    const cudaError_t e = Runtime().EventSynchronize(event);
    std::lock_guard<std::mutex> lock(mu_);
    free_events_.push_back(event);
    return e == cudaSuccess ? Status::Ok() : CudaError("the copy", e);
  }

 private:
  /// Plans the copies and queues them on the engine's stream, after the work queued so far on
  /// the compute stream (a gather reads blocks the forward pass just wrote; a scatter overwrites
  /// blocks it may still read), followed by the ticket's event.
  Result<CopyTicket> Start(std::span<const uint32_t> block_ids, uint64_t staging,
                           CopyDirection direction) {
    const CudaRuntime& rt = Runtime();
    std::lock_guard<std::mutex> lock(mu_);
    runs_.clear();
    PlanCopies(regions_, block_ids, staging, direction, &runs_);
    if (runs_.empty()) {
      in_flight_.emplace(++last_, nullptr);
      return last_;
    }
    if (cudaError_t e = rt.SetDevice(device_); e != cudaSuccess)
      return CudaError("cudaSetDevice", e);
    if (cudaError_t e = rt.EventRecord(ready_, compute_stream_); e != cudaSuccess) {
      return CudaError("cudaEventRecord", e);
    }
    if (cudaError_t e = rt.StreamWaitEvent(stream_, ready_, 0); e != cudaSuccess) {
      return CudaError("cudaStreamWaitEvent", e);
    }
    if (Status s = Submit(rt); !s.ok()) {
      rt.StreamSynchronize(stream_);  // what was queued finishes before the caller frees staging
      return s;
    }
    cudaEvent_t done = nullptr;
    if (!free_events_.empty()) {
      done = free_events_.back();
      free_events_.pop_back();
    } else if (cudaError_t e = rt.EventCreateWithFlags(&done, cudaEventDisableTiming);
               e != cudaSuccess) {
      rt.StreamSynchronize(stream_);
      return CudaError("cudaEventCreateWithFlags", e);
    }
    if (cudaError_t e = rt.EventRecord(done, stream_); e != cudaSuccess) {
      free_events_.push_back(done);
      rt.StreamSynchronize(stream_);
      return CudaError("cudaEventRecord", e);
    }
    in_flight_.emplace(++last_, done);
    return last_;
  }

  /// One cudaMemcpyBatchAsync of runs_, or one cudaMemcpyAsync per run without it.
  Status Submit(const CudaRuntime& rt) {
    if (rt.MemcpyBatchAsync != nullptr) {
      dsts_.resize(runs_.size());
      srcs_.resize(runs_.size());
      sizes_.resize(runs_.size());
      for (size_t i = 0; i < runs_.size(); ++i) {
        dsts_[i] = reinterpret_cast<void*>(runs_[i].dst);
        srcs_[i] = reinterpret_cast<const void*>(runs_[i].src);
        sizes_[i] = runs_[i].bytes;
      }
      cudaMemcpyAttributes attr{};
      attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
      attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
      size_t attr_index = 0;
      const cudaError_t e = rt.MemcpyBatchAsync(dsts_.data(), srcs_.data(), sizes_.data(),
                                                runs_.size(), &attr, &attr_index, 1, stream_);
      return e == cudaSuccess ? Status::Ok() : CudaError("cudaMemcpyBatchAsync", e);
    }
    for (const CopyRun& r : runs_) {
      const cudaError_t e =
          rt.MemcpyAsync(reinterpret_cast<void*>(r.dst), reinterpret_cast<const void*>(r.src),
                         r.bytes, cudaMemcpyDefault, stream_);
      if (e != cudaSuccess) return CudaError("cudaMemcpyAsync", e);
    }
    return Status::Ok();
  }

  const int device_;
  cudaStream_t stream_;
  cudaEvent_t ready_;
  cudaStream_t compute_stream_ = nullptr;  // the legacy default stream until told otherwise
  std::mutex mu_;
  CopyTicket last_ = 0;
  std::unordered_map<CopyTicket, cudaEvent_t> in_flight_;  // null event: an empty copy
  std::vector<cudaEvent_t> free_events_;
  std::vector<CopyRun> runs_;
  std::vector<void*> dsts_;
  std::vector<const void*> srcs_;
  std::vector<size_t> sizes_;
};

}  // namespace

bool CudaBuilt() { return true; }

Status CudaAvailable() {
  std::string why;
  const CudaRuntime* rt = LoadedRuntime(&why);
  if (rt == nullptr) return Status(ErrorCode::kUnsupported, why);
  int count = 0;
  if (cudaError_t e = rt->GetDeviceCount(&count); e != cudaSuccess) {
    return Status(ErrorCode::kUnsupported,
                  std::string("no usable CUDA device: ") + rt->GetErrorString(e));
  }
  if (count == 0) return Status(ErrorCode::kUnsupported, "no CUDA device");
  return Status::Ok();
}

Status CudaHostRegister(uint64_t address, uint64_t bytes) {
  if (Status s = CudaAvailable(); !s.ok()) return s;
  const cudaError_t e =
      Runtime().HostRegister(reinterpret_cast<void*>(address), bytes, cudaHostRegisterPortable);
  return e == cudaSuccess ? Status::Ok() : CudaError("cudaHostRegister", e);
}

Status CudaHostUnregister(uint64_t address) {
  if (Status s = CudaAvailable(); !s.ok()) return s;
  const cudaError_t e = Runtime().HostUnregister(reinterpret_cast<void*>(address));
  return e == cudaSuccess ? Status::Ok() : CudaError("cudaHostUnregister", e);
}

Result<std::unique_ptr<CopyEngine>> MakeCudaCopyEngine(std::vector<KVRegion> regions, int device) {
  if (Status s = ValidateRegions(regions); !s.ok()) return s;
  if (Status s = CudaAvailable(); !s.ok()) return s;
  const CudaRuntime& rt = Runtime();
  if (device < 0) {
    if (cudaError_t e = rt.GetDevice(&device); e != cudaSuccess)
      return CudaError("cudaGetDevice", e);
  }
  if (cudaError_t e = rt.SetDevice(device); e != cudaSuccess) {
    return Status(ErrorCode::kInvalidArgument,
                  "CUDA device " + std::to_string(device) + ": " + rt.GetErrorString(e));
  }
  // Every region must be memory of that device (a host region would silently copy host to host).
  for (size_t r = 0; r < regions.size(); ++r) {
    cudaPointerAttributes attr{};
    const cudaError_t e =
        rt.PointerGetAttributes(&attr, reinterpret_cast<const void*>(regions[r].base));
    if (e != cudaSuccess || attr.type != cudaMemoryTypeDevice || attr.device != device) {
      return Status(ErrorCode::kInvalidArgument, "KV region " + std::to_string(r) +
                                                     " is not memory of CUDA device " +
                                                     std::to_string(device));
    }
  }
  cudaStream_t stream = nullptr;
  if (cudaError_t e = rt.StreamCreateWithFlags(&stream, cudaStreamNonBlocking); e != cudaSuccess) {
    return CudaError("cudaStreamCreateWithFlags", e);
  }
  cudaEvent_t ready = nullptr;
  if (cudaError_t e = rt.EventCreateWithFlags(&ready, cudaEventDisableTiming); e != cudaSuccess) {
    rt.StreamDestroy(stream);
    return CudaError("cudaEventCreateWithFlags", e);
  }
  return std::unique_ptr<CopyEngine>(new CudaCopyEngine(std::move(regions), device, stream, ready));
}

}  // namespace kvpool
