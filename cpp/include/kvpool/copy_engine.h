// The copy engine: moves KV blocks between an inference engine's paged KV cache and contiguous
// staging memory, where each block is one stored object.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kvpool/status.h"

namespace kvpool {

/// One strided run of a block's bytes in the engine's cache: block b's share of this region
/// starts at `base + b * stride` and spans `bytes`. A layer whose K and V are separate planes
/// ([2, num_blocks, ...]) is two regions; a layer laid out [num_blocks, ...] is one. A block's
/// stored object is its regions' bytes, concatenated in region order.
struct KVRegion {
  uint64_t base = 0;        ///< Address (host memory for the CPU engine, device for CUDA).
  uint64_t stride = 0;      ///< Bytes from block b to block b + 1.
  uint64_t bytes = 0;       ///< Bytes of one block in this region (at most `stride`).
  uint32_t num_blocks = 0;  ///< Valid block ids are [0, num_blocks).
};

/// Names a copy started by StartGather or StartScatter, until Wait has returned for it.
using CopyTicket = uint64_t;

/// Gathers blocks out of a paged KV cache into staging memory and scatters them back. Object i
/// of a call sits at `staging + i * object_bytes()`. Every call checks its block ids and the
/// staging size before it copies anything, so a bad argument leaves the cache untouched.
/// Copies are started (a ticket) and waited for; Gather and Scatter do both. The CPU engine has
/// finished when Start returns; the CUDA engine runs on its own stream meanwhile.
/// Implementations: CPU (always built) and CUDA (when kvpool is built with CUDA).
class CopyEngine {
 public:
  virtual ~CopyEngine() = default;

  /// Bytes of one block's stored object: the sum of its regions' bytes.
  uint64_t object_bytes() const { return object_bytes_; }
  /// Block ids accepted: [0, num_blocks()).
  uint32_t num_blocks() const { return num_blocks_; }
  const std::vector<KVRegion>& regions() const { return regions_; }
  /// "cpu" or "cuda".
  virtual const char* device() const = 0;
  /// CUDA: the stream (a cudaStream_t) whose queued work a copy waits for before it starts,
  /// e.g. torch's current stream; 0 is the legacy default stream. Ignored by the CPU engine.
  virtual void SetComputeStream(uint64_t stream) {}

  /// Starts copying the blocks `block_ids` from the cache into `staging`, which must stay
  /// valid until Wait returns for the ticket. Errors (nothing started): InvalidArgument naming
  /// the bad block id or the staging size; the device's error.
  virtual Result<CopyTicket> StartGather(std::span<const uint32_t> block_ids,
                                         std::span<uint8_t> staging) = 0;
  /// Starts copying objects from `staging` into the cache blocks `block_ids` (no id twice);
  /// `staging` must stay valid and unchanged until Wait returns. Errors as StartGather, and
  /// InvalidArgument naming a repeated block id.
  virtual Result<CopyTicket> StartScatter(std::span<const uint32_t> block_ids,
                                          std::span<const uint8_t> staging) = 0;
  /// Blocks until the copy of `ticket` has finished: Ok, or the error it met. A ticket is waited
  /// for once; an unknown ticket, or one already waited for, is InvalidArgument.
  virtual Status Wait(CopyTicket ticket) = 0;

  /// StartGather, then Wait.
  Status Gather(std::span<const uint32_t> block_ids, std::span<uint8_t> staging);
  /// StartScatter, then Wait.
  Status Scatter(std::span<const uint32_t> block_ids, std::span<const uint8_t> staging);

 protected:
  explicit CopyEngine(std::vector<KVRegion> regions);
  /// The checks every call makes before copying.
  Status CheckCall(const char* op, std::span<const uint32_t> block_ids, size_t staging_bytes,
                   bool distinct) const;
  /// Wait's error for a ticket not in flight.
  static Status UnknownTicket(CopyTicket ticket);

  std::vector<KVRegion> regions_;
  uint64_t object_bytes_ = 0;
  uint32_t num_blocks_ = 0;
};

/// Checks the regions: at least one, each with bytes in (0, stride] (or any bytes when it has a
/// single block) and num_blocks > 0. Errors: InvalidArgument naming the region.
Status ValidateRegions(std::span<const KVRegion> regions);

/// A CPU copy engine over host memory. Calls that move at least `parallel_bytes` split their
/// blocks over up to `threads` threads (1 = always on the calling thread).
Result<std::unique_ptr<CopyEngine>> MakeCpuCopyEngine(std::vector<KVRegion> regions,
                                                      unsigned threads = 1,
                                                      uint64_t parallel_bytes = 8ULL << 20);

/// True when this build has the CUDA copy engine (the CUDA runtime's headers were found).
bool CudaBuilt();
/// Ok when the CUDA engine can be used now (the runtime, libcudart.so.13, loads and a device is
/// present); Unsupported with the reason otherwise, and always when not built with CUDA.
Status CudaAvailable();
/// Page-locks host memory (cudaHostRegister) so copies to and from it run at full speed.
Status CudaHostRegister(uint64_t address, uint64_t bytes);
Status CudaHostUnregister(uint64_t address);
/// A CUDA copy engine over regions of device memory of `device` (-1: the current device), with
/// host staging. Its copies run on a stream of its own, after the work queued on its compute
/// stream (SetComputeStream), and each call waits for that stream only.
/// Errors: Unsupported (not built, no runtime or device), InvalidArgument (bad regions, a region
/// not on the device).
Result<std::unique_ptr<CopyEngine>> MakeCudaCopyEngine(std::vector<KVRegion> regions,
                                                       int device = -1);

}  // namespace kvpool
