// Client for one storage node: batched, pipelined requests with a deadline on every call.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "kvpool/buffer.h"
#include "kvpool/hashing.h"
#include "kvpool/protocol.h"
#include "kvpool/staging.h"
#include "kvpool/status.h"
#include "kvpool/transport.h"

namespace kvpool {

namespace detail {
class ClientConnection;
}  // namespace detail
namespace rdma {
class Device;
struct MemoryRegion;
}  // namespace rdma

/// Which transport a client uses. kAuto: shared memory when the node serves it on this host,
/// else TCP, falling back to TCP (logged once, with the reason) when shared memory fails.
enum class TransportChoice { kAuto, kTcp, kShm, kRdma };
/// "auto", "tcp", "shm" or "rdma"; InvalidArgument naming the value otherwise. Auto picks shared
/// memory on the node's host, RDMA to a node elsewhere that offers it, else TCP.
Result<TransportChoice> ParseTransportChoice(std::string_view name);

struct ClientOptions {
  std::string host = "127.0.0.1";
  uint16_t port = 0;
  uint32_t timeout_ms = 5000;          ///< Deadline of each call, from its start.
  uint32_t connect_timeout_ms = 2000;  ///< Bounded also by the call's deadline.
  uint32_t max_idle_connections = 8;   ///< Connections kept open between calls.
  TransportChoice transport = TransportChoice::kAuto;
  /// Staging memory shared with the node over shared memory: buffers inside it cross with one
  /// copy on the node, others ride inline on the socket. Null: the client makes one of
  /// `arena_bytes` when it first uses shared memory. Share one arena among the clients of a
  /// process (a Cluster does) so that one staging buffer is zero-copy to every same-host node.
  std::shared_ptr<StagingArena> arena;
  size_t arena_bytes = size_t{64} << 20;
  /// RDMA device selection (read when the client first uses RDMA).
  RdmaOptions rdma;
  /// The data-plane auth token proven to nodes that require one (empty: none). With a token the
  /// client speaks protocol v2 only.
  std::string auth_token;
};

/// Talks to one node. Thread-safe: concurrent calls use separate connections from a small pool,
/// so threads do not serialise on one socket (a large PUT or GetInto batch is itself moved over
/// two connections at once); a pooled connection found dead is replaced once, transparently, so
/// a client survives a node restart. A batch larger than the node's limits is split into several
/// frames that are pipelined on one connection. Any failure of a call closes the connection it
/// used (the next call opens a fresh one), so a timed-out reply can never be mistaken for the
/// answer to a later request.
class Client {
 public:
  /// Connects once and performs the HELLO handshake, so a bad address fails here.
  static Result<std::unique_ptr<Client>> Connect(const ClientOptions& options);
  ~Client();

  /// Stores blocks; statuses[i] is a protocol::PutStatus (stored, exists, no space, too large).
  Status Put(std::span<const Key128> keys, std::span<const ConstBuffer> blocks,
             std::span<uint8_t> statuses);
  /// Reads blocks; for each present key, `dest(i, size)` names where its bytes go (nullptr
  /// drops them). found[i] is 1 when the block was delivered.
  Status Get(std::span<const Key128> keys,
             const std::function<uint8_t*(size_t index, size_t size)>& dest,
             std::span<uint8_t> found);
  /// Reads blocks straight into caller memory. A block whose size differs from its buffer is
  /// dropped and reported as not found (found[i] = 0).
  Status GetInto(std::span<const Key128> keys, std::span<const MutableBuffer> buffers,
                 std::span<uint8_t> found);
  Status Exists(std::span<const Key128> keys, std::span<uint8_t> present);
  Result<size_t> MatchPrefix(std::span<const Key128> keys);
  Status Delete(std::span<const Key128> keys, std::span<uint8_t> deleted);
  Result<std::string> StatsJson();

  /// The limits the node announced on the most recent connection.
  protocol::Limits limits() const {
    std::lock_guard<std::mutex> lock(mu_);
    return limits_;
  }
  std::string address() const;
  /// The transport of the most recent connection.
  TransportKind transport() const {
    std::lock_guard<std::mutex> lock(mu_);
    return last_kind_;
  }
  /// The staging arena (made on first use of shared memory; null before and on TCP-only).
  std::shared_ptr<StagingArena> arena() const {
    std::lock_guard<std::mutex> lock(mu_);
    return arena_;
  }
  /// The arena, made now (of options.arena_bytes) if there is none yet.
  Result<std::shared_ptr<StagingArena>> EnsureArena();

 private:
  using Connection = detail::ClientConnection;
  explicit Client(const ClientOptions& options);
  /// An idle pooled connection (when allowed and available) or a new one after HELLO.
  Result<std::unique_ptr<Connection>> Acquire(bool allow_idle);
  Result<std::unique_ptr<Connection>> DialTcp(net::Deadline deadline);
  Result<std::unique_ptr<Connection>> DialShm(net::Deadline deadline);
  Result<std::unique_ptr<Connection>> DialRdma(net::Deadline deadline);
  /// After the first HELLO: moves to shared memory when the node offers it on this host.
  Status ChooseTransport(std::unique_ptr<Connection>& tcp, net::Deadline deadline);
  void NoteFallback(const Status& why);
  void Release(std::unique_ptr<Connection> conn);
  /// Runs `fn` on a pooled connection; on error the connection is discarded, on success returned.
  Status WithConnection(const std::function<Status(Connection&)>& fn);
  /// Sends `keys` as pipelined frames of `op`; on_reply reads each reply's body (its header is
  /// already checked) for the frame starting at key `begin`.
  /// With `buffers` (GET only) and a shared-memory connection, entries name the arena runs the
  /// node should copy into.
  Status KeyRequest(
      protocol::Op op, std::span<const Key128> keys,
      const std::function<Status(Connection&, size_t begin, const protocol::Header&)>& on_reply,
      std::span<const MutableBuffer> buffers = {});
  Status GetImpl(std::span<const Key128> keys, std::span<const MutableBuffer> buffers,
                 const std::function<uint8_t*(size_t index, size_t size)>& dest,
                 std::span<uint8_t> found);
  Status FlagRequest(protocol::Op op, std::span<const Key128> keys, std::span<uint8_t> flags);
  Status PutRange(std::span<const Key128> keys, std::span<const ConstBuffer> blocks,
                  std::span<uint8_t> statuses);
  /// Runs fn(begin, end) over [0, n), as two concurrent halves when the batch is large.
  Status InHalves(size_t n, uint64_t bytes, const std::function<Status(size_t, size_t)>& fn);

  ClientOptions options_;
  protocol::Limits limits_;
  mutable std::mutex mu_;
  std::vector<std::unique_ptr<Connection>> idle_;
  std::shared_ptr<StagingArena> arena_;
  bool use_shm_ = false;                          // the node serves shared memory on this host
  bool use_rdma_ = false;                         // RDMA chosen (the node offers it)
  std::shared_ptr<rdma::Device> rdma_device_;     // opened on first RDMA dial
  std::unique_ptr<rdma::MemoryRegion> arena_mr_;  // the arena, registered with it
  std::chrono::steady_clock::time_point shm_retry_at_{};  // after a failure: TCP until then
  std::string shm_path_;  // the node's socket, as its last TCP HELLO named it
  std::string node_id_;   // the node's identity, from its last TCP HELLO
  bool fallback_logged_ = false;
  TransportKind last_kind_ = TransportKind::kTcp;
};

}  // namespace kvpool
