// How block payloads cross between a client and a node. Control (HELLO, the PUT table, GET keys,
// replies) always travels as frames on the connection's stream socket; a transport decides only
// how the payload bytes cross, and the node always moves them, so its pool never leaves its
// address space and nothing a peer does can change a committed block.
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvpool/buffer.h"
#include "kvpool/deadline.h"
#include "kvpool/protocol.h"
#include "kvpool/status.h"

namespace kvpool {

/// Wire values of the transport extension (protocol v2); never renumber.
enum class TransportKind : uint8_t { kTcp = 0, kShm = 1, kRdma = 2 };
inline constexpr size_t kTransportKinds = 3;

const char* TransportKindName(TransportKind kind);  ///< "tcp", "shm", "rdma"
/// "tcp", "shm" or "rdma"; InvalidArgument naming the value otherwise.
Result<TransportKind> ParseTransportKind(std::string_view name);

/// This host's identity for shared memory: the kernel's boot id (equal exactly for processes
/// under one running kernel, which is what passing a memfd needs), else the host name.
const std::string& LocalHostId();

/// Which RDMA device, port and GID a process uses (the seed's settings): nodes and clients take
/// the same ones. Only the libibverbs provider reads them; the software provider stands in for
/// one device of its own.
struct RdmaOptions {
  /// "name[:gid_index],..." (e.g. "mlx5_1:6,mlx5_2:7"); empty: every device found.
  std::string devices;
  /// "IB" (LID routing) or "Ethernet" (RoCE v2: a GRH on the chosen GID).
  std::string link_type = "Ethernet";
  int port = 1;       ///< the device port, from 1
  int gpu = -1;       ///< the GPU this process is bound to (GPU i of n takes device i*ndev/n)
  int num_gpus = 0;   ///< GPUs on this host, for that mapping
  int gpu_numa = -1;  ///< the GPU's NUMA node when known: devices on it are preferred
};

/// InvalidArgument naming the bad part of a device list, link type, port or GPU binding.
Status ValidateRdmaOptions(const RdmaOptions& options);

/// A run of the client's registered staging arena as the node addresses it (shared memory: an
/// offset into the mapped arena). addr == protocol::kInline: the payload rides on the stream.
struct PeerBuffer {
  uint64_t addr = protocol::kInline;
  uint64_t size = 0;
  bool described() const { return addr != protocol::kInline; }
};

/// GET: whether block bytes of `size` go into the described run `to` (else inline on the
/// stream). Both sides apply this one rule, so the reply needs no per-block marker: only a run of
/// exactly the block's size receives it (a size mismatch reads as a miss on the client and must
/// leave its buffer untouched).
inline bool DeliveredInPeer(const PeerBuffer& to, uint64_t size) {
  return to.described() && to.size == size;
}

/// The node's side of one connection's payload path, opened at HELLO. Inline payloads are read
/// from and written to the stream here; a transport with peer memory (shared memory, RDMA)
/// implements the described copies. Any error closes the connection, and the caller aborts the
/// frame's reservations and drops its pins as for every other failure.
class Link {
 public:
  explicit Link(int fd) : fd_(fd) {}
  virtual ~Link() = default;
  Link(const Link&) = delete;
  Link& operator=(const Link&) = delete;

  virtual TransportKind kind() const = 0;
  /// Checks the described runs of one frame before anything is copied: each lies inside the
  /// peer's registered memory and no two overlap. BadFrame naming the run otherwise (a link
  /// without peer memory refuses every described run).
  virtual Status CheckRuns(std::span<const PeerBuffer> runs);

  /// PUT: fills into[i] from from[i]: described runs are copied from the peer's memory, inline
  /// payloads are read off the stream in table order. into[i].data == nullptr drops the bytes
  /// (a refused block); into[i].size is the block's length.
  Status Pull(std::span<const PeerBuffer> from, std::span<const MutableBuffer> into,
              net::Deadline deadline);
  /// GET: copies blocks[i] to to[i] when DeliveredInPeer, then writes `head` (the reply header
  /// and lengths) followed by the other present blocks in one gather. blocks[i].data == nullptr:
  /// absent key.
  Status Push(std::span<const iovec> head, std::span<const ConstBuffer> blocks,
              std::span<const PeerBuffer> to, net::Deadline deadline);

 protected:
  /// Copies the described runs of from[i] into into[i] (entries that are inline or refused are
  /// skipped). Called only with runs CheckRuns accepted.
  virtual Status ReadPeer(std::span<const PeerBuffer> from, std::span<const MutableBuffer> into);
  /// Copies blocks[i] into to[i] where DeliveredInPeer.
  virtual Status WritePeer(std::span<const ConstBuffer> blocks, std::span<const PeerBuffer> to);

  /// Closed once the client has closed its end (checked around copies of its memory).
  Status PeerStillConnected() const;

  int fd_;

 private:
  std::vector<uint8_t> scratch_;  // drops refused inline payloads
  std::vector<iovec> iov_;
};

/// Checks `runs` (the described ones) against a region of `region_bytes` bytes: in bounds, no
/// overlaps. `sorted` is scratch space, reused across frames.
Status CheckRunsInRegion(std::span<const PeerBuffer> runs, uint64_t region_bytes,
                         std::vector<PeerBuffer>& sorted);

}  // namespace kvpool
