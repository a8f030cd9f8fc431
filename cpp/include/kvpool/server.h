// The storage node's data path: a TCP listener serving the binary protocol from a BlockStore.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "kvpool/block_store.h"
#include "kvpool/protocol.h"
#include "kvpool/status.h"
#include "kvpool/transport.h"

namespace kvpool {
namespace rdma {
class Device;
struct MemoryRegion;
}  // namespace rdma

struct ServerOptions {
  std::string host = "127.0.0.1";
  uint16_t port = 0;  ///< 0 = any free port; see Server::port()
  BlockStoreOptions store;
  protocol::Limits limits;
  uint32_t max_connections = 16384;
  /// A frame (request read or reply written) must complete within this once its header arrived;
  /// a writer that stalls longer is disconnected and its reservations freed.
  uint32_t io_timeout_ms = 30000;
  /// Transports served. TCP is always served (it carries discovery and every client that is not
  /// on this host); kShm adds the unix-domain socket below; kRdma is served when an RDMA device
  /// opens (without one the node says why, once, and serves the rest).
  std::vector<TransportKind> transports = {TransportKind::kTcp, TransportKind::kShm,
                                           TransportKind::kRdma};
  /// The shared-memory socket. Empty: $XDG_RUNTIME_DIR (else /tmp)
  /// /kvpool-<uid>/node-<host>-<port>.sock, in a directory only this uid can enter.
  std::string shm_socket;
  /// Peers allowed on the shared-memory socket besides this process's uid and root (SO_PEERCRED:
  /// the peer's uid, or its primary gid).
  std::vector<uint32_t> shm_allow_uids, shm_allow_gids;
  /// Largest arena one connection may map, and all connections together (address space).
  uint64_t shm_max_arena_bytes = uint64_t{64} << 30;
  /// RDMA device selection (read only when "rdma" is served and a provider opens).
  RdmaOptions rdma;
  /// Data-plane auth tokens: when any is set, a connection must prove one (HELLO nonce, then
  /// AUTH) before anything else. Several are accepted at once, for rotation.
  std::vector<std::string> auth_tokens;
  uint64_t shm_max_mapped_bytes = uint64_t{1} << 40;
};

/// Serves the protocol on one listening socket. Each connection gets an I/O thread that reads
/// frames straight into pool memory and writes replies straight from it (scatter/gather, no
/// staging copy). Requests on one connection are answered in order; clients pipeline by sending
/// the next request before the previous reply arrives. Protocol violations get an error reply and
/// the connection is closed; nothing a peer sends can change a committed block.
class Server {
 public:
  /// Creates the store, binds and starts accepting. Errors: the store's, or Connection for bind.
  static Result<std::unique_ptr<Server>> Start(const ServerOptions& options);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  /// Stops accepting, disconnects every client (their reservations are aborted) and joins all
  /// threads. Idempotent.
  void Stop();

  uint16_t port() const { return port_; }
  /// The shared-memory socket's path; empty when shared memory is not served.
  const std::string& shm_socket() const { return shm_path_; }
  /// 16 random bytes naming this node process (a client checks that the socket it found on its
  /// host belongs to the node it asked).
  const std::string& node_id() const { return node_id_; }
  const std::string& host() const { return options_.host; }
  BlockStore& store() { return *store_; }
  /// The STATS reply: store counters plus connection counts, as a JSON object.
  std::string StatsJson() const;

  /// Upper bounds (microseconds) of the request-latency histogram's buckets; one more bucket
  /// counts everything slower (STATS "latency_bounds_us").
  static constexpr std::array<uint32_t, 18> kLatencyBoundsUs = {
      25,    50,    100,    250,    500,    1000,    2500,    5000,    10000,
      25000, 50000, 100000, 250000, 500000, 1000000, 2500000, 5000000, 10000000};
  /// Request counters of one (op, transport): STATS "ops". A request is a frame whose header
  /// arrived; its latency runs from then until its reply is sent; an error is a request answered
  /// with an error (which closes the connection) or cut off mid-frame.
  struct OpCounters {
    std::atomic<uint64_t> requests{0}, errors{0}, keys{0}, bytes{0}, latency_sum_us{0};
    std::array<std::atomic<uint64_t>, kLatencyBoundsUs.size() + 1> latency{};
  };
  /// Op slots: the op byte (1..8), and 0 for a frame whose op is not one of them.
  static constexpr size_t kOpSlots = 9;
  /// Connections spread their counting over this many copies of the table (summed by STATS), so
  /// connection threads seldom write the same cache line.
  static constexpr size_t kOpShards = 8;
  using OpTable = std::array<std::array<OpCounters, kTransportKinds>, kOpSlots>;

  /// Per-transport counters (STATS "transports").
  struct TransportCounters {
    std::atomic<uint64_t> connections{0}, accepted{0}, bytes_in{0}, bytes_out{0};
    /// Of those, the bytes copied through the peer's memory (described entries).
    std::atomic<uint64_t> copied_in{0}, copied_out{0};
  };

 private:
  struct Connection;
  Server(const ServerOptions& options, std::unique_ptr<BlockStore> store, int listen_fd,
         uint16_t port);
  void AcceptLoop();
  void Admit(int fd, TransportKind listener);
  void Serve(Connection* conn);
  void ReapFinished();

  ServerOptions options_;
  std::unique_ptr<BlockStore> store_;
  int listen_fd_;
  uint16_t port_;
  int shm_fd_ = -1;
  std::string shm_path_;
  int wake_[2] = {-1, -1};  // a pipe: Stop() wakes the accept loop through it
  std::string node_id_;
  std::array<TransportCounters, kTransportKinds> per_transport_;
  std::unique_ptr<std::array<OpTable, kOpShards>> ops_;
  std::atomic<uint64_t> shm_mapped_{0};
  std::shared_ptr<rdma::Device> rdma_device_;      // null: RDMA not served
  std::unique_ptr<rdma::MemoryRegion> rdma_pool_;  // the pool, registered local-only
  std::atomic<bool> stopping_{false};
  std::thread accept_thread_;
  mutable std::mutex conns_mu_;
  std::list<std::unique_ptr<Connection>> conns_;
  std::atomic<uint64_t> accepted_{0}, rejected_{0}, protocol_errors_{0};
  std::atomic<uint64_t> auth_refused_{0};  // connections refused for a missing or wrong token
};

}  // namespace kvpool
