// The verbs the RDMA transport uses, behind one thin interface with two providers: libibverbs
// (real devices) and a software provider (KVPOOL_RDMA_PROVIDER=soft, never the default) that gives
// the same semantics between processes on one host, so the transport's whole code path runs on
// machines without a device: registered memory regions with keys and access rights, RC queue pairs
// that move through RESET -> INIT -> RTR -> RTS, one-sided READ and WRITE, completions in order,
// access and length errors that put the QP into the error state, and a flush of the work queued
// behind an error or a vanished peer.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvpool/deadline.h"
#include "kvpool/status.h"
#include "kvpool/transport.h"

namespace kvpool::rdma {

enum Access : uint32_t {
  kLocalWrite = 1,
  kRemoteRead = 2,
  kRemoteWrite = 4,
};

struct MemoryRegion {
  uint64_t addr = 0;
  uint64_t length = 0;
  uint32_t lkey = 0;
  uint32_t rkey = 0;
  uint32_t access = 0;
};

/// What a peer needs to connect its QP to ours (exchanged in HELLO's transport extension).
struct QpAddress {
  uint32_t qp_num = 0;
  uint32_t psn = 0;
  uint16_t lid = 0;
  std::array<uint8_t, 16> gid{};
  uint64_t soft_pid = 0;    ///< software provider: the owning process
  uint64_t soft_table = 0;  ///< software provider: its memory-region table's address
  /// The path MTU this side can use (ibv_mtu: 1 = 256 .. 5 = 4096; 0 = no limit): both ends of
  /// an RC connection must use the same, so each takes the smaller of the two.
  uint8_t mtu = 0;
  /// RDMA READs this side accepts in flight as responder (the peer's initiator depth may not
  /// exceed it); 0 = no limit.
  uint8_t rd_atomic = 0;
};

enum class QpState { kReset, kInit, kRtr, kRts, kError };
const char* QpStateName(QpState state);

enum class Opcode : uint8_t { kRead, kWrite };

struct WorkRequest {
  uint64_t wr_id = 0;
  Opcode opcode = Opcode::kRead;
  uint64_t local_addr = 0;
  uint32_t lkey = 0;
  uint64_t length = 0;
  uint64_t remote_addr = 0;
  uint32_t rkey = 0;
  bool signaled = true;  ///< a completion is reported; errors are reported either way
};

/// ibv_wc_status values the transport distinguishes (the rest map to kGeneral).
enum class WcStatus : uint8_t {
  kSuccess,
  kLocalLength,      ///< local buffer outside its region
  kLocalProtection,  ///< bad lkey, or the local region lacks the access
  kRemoteAccess,     ///< bad rkey, range outside the remote region, or access not granted
  kRetryExceeded,    ///< the peer is gone (RC retries exhausted)
  kFlushed,          ///< queued behind an error: not executed
  kGeneral,
};
const char* WcStatusName(WcStatus status);

struct Completion {
  uint64_t wr_id = 0;
  WcStatus status = WcStatus::kSuccess;
  Opcode opcode = Opcode::kRead;
  uint64_t bytes = 0;
};

class QueuePair {
 public:
  virtual ~QueuePair() = default;
  virtual QpAddress address() const = 0;
  virtual QpState state() const = 0;
  /// RESET -> INIT -> RTR -> RTS against `remote`. InvalidArgument for a peer address that
  /// cannot be reached; Protocol when the QP is not in RESET.
  virtual Status Connect(const QpAddress& remote) = 0;
  /// Queues work requests (all or none). Protocol when the QP is not in RTS (an error-state QP
  /// refuses new work; the caller reconnects). At most `max_outstanding()` unpolled.
  virtual Status Post(std::span<const WorkRequest> requests) = 0;
  /// Up to out.size() completions, in posting order; waits until at least one or the deadline
  /// (Timeout). Signalled successes and every error are reported; after an error every request
  /// behind it completes kFlushed and the QP is in kError.
  virtual Result<size_t> Poll(std::span<Completion> out, net::Deadline deadline) = 0;
  virtual size_t max_outstanding() const = 0;
  /// After a failure (an error completion, a timeout, a failed post): returns only once the
  /// device will touch none of the memory of the work posted so far (moves the QP to the error
  /// state and drains the flushes; destroys the QP when they do not come). The caller may then
  /// free or reuse that memory. The QP is unusable afterwards.
  virtual void Quiesce() = 0;
};

/// What every provider's Post checks first: the QP is in RTS (an error-state QP refuses new
/// work) and `adding` more requests fit beside the `outstanding` ones under `max`.
Status CheckPost(QpState state, uint64_t outstanding, size_t adding, size_t max);

/// One opened device (or the software provider's stand-in).
class Device {
 public:
  virtual ~Device() = default;
  virtual const std::string& name() const = 0;
  /// One line for the log: the device, port and GID chosen, and why.
  virtual const std::string& description() const = 0;
  virtual bool software() const = 0;
  /// Registers [addr, addr + length) with `access` (Access bits). The node registers its pool
  /// with kLocalWrite only; a client its arena with remote read and write.
  virtual Result<MemoryRegion> Register(void* addr, size_t length, uint32_t access) = 0;
  virtual void Deregister(const MemoryRegion& region) = 0;
  virtual Result<std::unique_ptr<QueuePair>> CreateQp(size_t max_outstanding) = 0;
};

/// The software provider's device: the same semantics between processes of one host, moved
/// by process_vm_readv / process_vm_writev (the peer must be allowed to ptrace us: same uid, or
/// root). Selected by KVPOOL_RDMA_PROVIDER=soft, never by default. KVPOOL_RDMA_SOFT_FAIL_EVERY=N
/// fails every Nth request with a remote access error (fault injection for tests).
Result<std::unique_ptr<Device>> OpenSoftDevice();

/// The device this process uses: the software provider when KVPOOL_RDMA_PROVIDER=soft, else
/// the libibverbs device `options` select among those under `sysfs_root`. Unsupported naming
/// why when there is none (no rdma-core, no device: the caller serves or uses TCP);
/// InvalidArgument when the options ask for what this machine lacks (a listed device that is
/// not here, a port that is down, a GID index it does not have).
Result<std::unique_ptr<Device>> OpenDevice(const RdmaOptions& options,
                                           const std::string& sysfs_root = "/sys/class/infiniband");

/// QP address and arena region as they travel in HELLO's transport extension (little-endian):
/// u32 qp_num, u32 psn, u16 lid, gid[16], u64 soft_pid, u64 soft_table, u8 mtu, u8 rd_atomic;
/// the offer adds u64 arena_addr, u64 arena_length, u32 arena_rkey.
inline constexpr size_t kQpAddressBytes = 44;
inline constexpr size_t kArenaRegionBytes = 20;
std::string EncodeQpAddress(const QpAddress& a);
bool DecodeQpAddress(std::string_view bytes, QpAddress* out);

}  // namespace kvpool::rdma
