#include "kvpool/client.h"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <thread>

#include "support/auth.h"
#include "support/log.h"
#include "support/socket.h"
#include "transport/rdma/verbs.h"
#include "transport/shm/shm_link.h"

namespace kvpool {

using protocol::Header;
using protocol::Op;

namespace {

constexpr size_t kScratchBytes = 256 << 10;
// Frames in flight per connection. Small requests (GET, EXISTS, ...) are capped at two so that
// requests queued behind a large reply always fit in the socket buffers.
constexpr size_t kPutWindow = 4;
constexpr size_t kQueryWindow = 2;
// Batches at least this large are moved over two connections at once (Client::InHalves).
constexpr uint64_t kParallelBatchBytes = uint64_t{8} << 20;
// How long a failed call on shared memory waits for the node to finish the frames it sent (the
// node's default io_timeout: a node that is alive finishes far sooner).
constexpr int kDrainGraceMs = 30000;
// After shared memory failed, new connections use TCP for this long before trying it again.
constexpr auto kShmRetryAfter = std::chrono::seconds(5);

struct Range {
  size_t begin, end;
};

}  // namespace

namespace detail {

class ClientConnection {
 public:
  /// `auth_token`: proven to the node at HELLO when the node asks (empty: none).
  ClientConnection(net::Fd fd, std::string where, std::string_view auth_token)
      : fd_(std::move(fd)), where_(std::move(where)), auth_token_(auth_token) {}
  ~ClientConnection() {
    // Shutdown reaches the socket itself, even when a fork() left a copy of the descriptor in
    // another process: the node sees the hang-up and commits nothing copied after it.
    if (arena != nullptr) shutdown(fd_.get(), SHUT_RDWR);
  }
  ClientConnection(const ClientConnection&) = delete;
  ClientConnection& operator=(const ClientConnection&) = delete;

  /// The handshake. With `arena`, offers shared memory and passes the arena's memfd with the
  /// HELLO (a unix-domain connection); without, speaks v1 or v2 as the node does.
  /// With an `offer` (the transport extension's value), speaks v2 only and passes `pass_fd`
  /// (>= 0: shared memory's arena memfd) with the HELLO; without, speaks v1 or v2 as the node
  /// does.
  Status Hello(net::Deadline deadline, std::string_view offer = {}, int pass_fd = -1) {
    std::string body(protocol::kHelloRequestBytes, '\0');
    // Extensions (a transport offer, the auth nonce) need version 2 of the node.
    const bool v2_only = !offer.empty() || !auth_token_.empty();
    const uint32_t min = v2_only ? 2 : protocol::kMinVersion, max = protocol::kVersion;
    std::memcpy(body.data(), &min, 4);
    std::memcpy(body.data() + 4, &max, 4);
    Header h;
    h.op = Op::kHello;
    h.request_id = ++next_id_;
    if (!offer.empty()) protocol::AppendExt(body, protocol::Ext::kTransport, offer);
    const std::string method(1, static_cast<char>(auth::kHmacSha256));
    const std::string client_nonce = auth_token_.empty() ? "" : auth::RandomNonce();
    if (!auth_token_.empty())
      protocol::AppendExt(body, protocol::Ext::kAuth, method + client_nonce);
    h.body_bytes = body.size();
    uint8_t raw[protocol::kHeaderBytes];
    protocol::EncodeHeader(h, raw);
    iovec iov[2] = {{raw, sizeof raw}, {body.data(), body.size()}};
    KVPOOL_RETURN_IF_ERROR(pass_fd >= 0 ? net::SendAllWithFd(fd_.get(), iov, 2, pass_fd, deadline)
                                        : net::SendAll(fd_.get(), iov, 2, deadline));
    Header r;
    KVPOOL_RETURN_IF_ERROR(ReadReplyHeader(Op::kHello, h.request_id, deadline, &r));
    if (r.body_bytes < protocol::kHelloReplyBytes ||
        r.body_bytes > protocol::kHelloReplyBytes + protocol::kMaxHelloBytes - 8) {
      return BadReply("HELLO reply size");
    }
    std::vector<uint8_t> reply(r.body_bytes);
    KVPOOL_RETURN_IF_ERROR(net::RecvAll(fd_.get(), reply.data(), reply.size(), deadline));
    limits = protocol::DecodeLimits(reply.data());
    if (limits.version < min || limits.version > max) return BadReply("HELLO version");
    if (limits.version == 1 && r.body_bytes != protocol::kHelloReplyBytes) {
      return BadReply("v1 HELLO reply size");
    }
    kind = TransportKind::kTcp;
    std::string node_nonce;
    KVPOOL_RETURN_IF_ERROR(protocol::ForEachExt(
        std::span<const uint8_t>(reply).subspan(protocol::kHelloReplyBytes),
        [&](uint16_t type, std::string_view value) -> Status {
          switch (static_cast<protocol::Ext>(type)) {
            case protocol::Ext::kAuth:
              if (value.size() != auth::kExtBytes || value[0] != auth::kHmacSha256) {
                return BadReply("auth challenge");
              }
              node_nonce = value.substr(1);
              break;
            case protocol::Ext::kTransport:
              if (value.empty()) return BadReply("transport answer");
              kind = static_cast<TransportKind>(value[0]);
              answer = value.substr(1);
              break;
            case protocol::Ext::kTransports:
              offers = value;
              break;
            case protocol::Ext::kNodeId:
              node_id = value;
              break;
            case protocol::Ext::kShmEndpoint: {
              uint16_t host_len = 0;
              if (value.size() >= 2) std::memcpy(&host_len, value.data(), 2);
              if (value.size() < 2u + host_len) return BadReply("shm endpoint");
              shm_host = value.substr(2, host_len);
              shm_path = value.substr(2 + host_len);
              break;
            }
            default:
              break;  // newer extensions
          }
          return Status::Ok();
        }));
    if (node_nonce.empty()) return Status::Ok();  // the node asks for no token
    return Authenticate(client_nonce, node_nonce, deadline);
  }

  /// AUTH: our proof over both nonces and the node id; the node answers with its own, which
  /// tells us it holds the token too (so no impostor gets the arena or the blocks).
  Status Authenticate(std::string_view client_nonce, std::string_view node_nonce,
                      net::Deadline deadline) {
    if (auth_token_.empty()) {
      return Status(ErrorCode::kUnauthorized, "node " + where_ +
                                                  " requires a data-plane auth token (set "
                                                  "auth_token or KVPOOL_AUTH_TOKEN)");
    }
    const std::string proof = auth::Proof(auth_token_, "client", client_nonce, node_nonce, node_id);
    const uint64_t id = SendFrame(Op::kAuth, 0, proof.data(), proof.size(), deadline);
    KVPOOL_RETURN_IF_ERROR(send_status_);
    Header r;
    KVPOOL_RETURN_IF_ERROR(ReadReplyHeader(Op::kAuth, id, deadline, &r));
    if (r.body_bytes != protocol::kAuthProofBytes) return BadReply("AUTH reply size");
    std::string theirs(protocol::kAuthProofBytes, '\0');
    KVPOOL_RETURN_IF_ERROR(net::RecvAll(fd_.get(), theirs.data(), theirs.size(), deadline));
    if (theirs != auth::Proof(auth_token_, "node", client_nonce, node_nonce, node_id)) {
      return Status(ErrorCode::kUnauthorized,
                    "node " + where_ +
                        " did not prove the auth token (another token, or not a "
                        "kvpool node)");
    }
    return Status::Ok();
  }

  /// Sends one frame made of the header and `iov` (which must leave iov[0] free for the header).
  uint64_t SendFrameV(Op op, uint32_t count, std::vector<iovec>& iov, uint64_t body_bytes,
                      net::Deadline deadline, uint8_t flags = 0) {
    Header h;
    h.op = op;
    h.flags = flags;
    h.request_id = ++next_id_;
    h.count = count;
    h.body_bytes = body_bytes;
    uint8_t raw[protocol::kHeaderBytes];
    protocol::EncodeHeader(h, raw);
    iov[0] = {raw, sizeof raw};
    send_status_ = net::SendAll(fd_.get(), iov.data(), iov.size(), deadline);
    return h.request_id;
  }

  uint64_t SendFrame(Op op, uint32_t count, const void* body, size_t body_bytes,
                     net::Deadline deadline, uint8_t flags = 0) {
    std::vector<iovec> iov = {{nullptr, 0}, {const_cast<void*>(body), body_bytes}};
    return SendFrameV(op, count, iov, body_bytes, deadline, flags);
  }

  /// Reads a reply header and checks it answers request `id`; error replies become Status.
  Status ReadReplyHeader(Op op, uint64_t id, net::Deadline deadline, Header* out) {
    uint8_t raw[protocol::kHeaderBytes];
    KVPOOL_RETURN_IF_ERROR(net::RecvAll(fd_.get(), raw, sizeof raw, deadline));
    *out = protocol::DecodeHeader(raw);
    if (out->magic != protocol::kMagic) return BadReply("reply magic");
    if (out->flags & protocol::kFlagError) {
      std::string msg(std::min<uint64_t>(out->body_bytes, 4096), '\0');
      (void)net::RecvAll(fd_.get(), msg.data(), msg.size(), deadline);
      return Status(static_cast<ErrorCode>(out->status), "node " + where_ + ": " + msg);
    }
    if (out->op != op || out->request_id != id) return BadReply("reply does not match its request");
    return Status::Ok();
  }

  Status BadReply(const std::string& what) const {
    return Status(ErrorCode::kProtocol, "node " + where_ + " sent a malformed reply: " + what);
  }

  /// After a failed call that let the node write into the arena: stop sending, and read until
  /// the node closes (it does once it has finished the frames already sent), so that no late
  /// copy lands in memory the caller reuses. Bounded by `grace`.
  void DrainUntilClosed(std::chrono::milliseconds grace) {
    shutdown(fd_.get(), SHUT_WR);
    const auto deadline = net::Deadline::In(grace);
    auto& buf = scratch();
    while (true) {
      iovec iov{buf.data(), buf.size()};
      const Status s = net::RecvSome(fd_.get(), &iov, deadline);
      if (s.code() == ErrorCode::kTimeout) {
        KVPOOL_LOG(kWarning, "node did not finish its frames after a failed call", "node", where_,
                   "waited_ms", grace.count());
      }
      if (!s.ok()) return;
    }
  }

  int fd() const { return fd_.get(); }
  const Status& send_status() const { return send_status_; }
  std::vector<uint8_t>& scratch() {
    if (scratch_.empty()) scratch_.resize(kScratchBytes);
    return scratch_;
  }
  // Reused per-connection buffers.
  std::vector<uint8_t> table;
  std::vector<uint64_t> lengths;
  std::vector<iovec> iov;
  std::vector<PeerBuffer> peer;
  std::vector<size_t> order;
  // The frame whose reply is being read.
  net::Deadline deadline = net::Deadline::Never();
  size_t frame_keys = 0;
  bool fresh = false;        // connected for this call, not taken from the idle pool
  bool peer_writes = false;  // described GET frames sent: the node may write into the arena
  protocol::Limits limits;   // as announced by this connection's HELLO
  TransportKind kind = TransportKind::kTcp;
  const StagingArena* arena = nullptr;  // shared memory: the arena the node mapped
  std::string node_id, shm_host, shm_path;
  std::string answer;  // the transport answer's bytes after its kind (RDMA: the node's QP)
  std::string offers;  // kinds the node serves beyond tcp (v2 TCP HELLO reply)
  std::unique_ptr<rdma::QueuePair> qp;  // RDMA: this connection's queue pair

 private:
  net::Fd fd_;
  std::string where_;
  std::string auth_token_;
  uint64_t next_id_ = 0;
  Status send_status_;
  std::vector<uint8_t> scratch_;
};

}  // namespace detail

using Connection = detail::ClientConnection;

namespace {

/// Splits [0, n) into frames of at most `max_keys` keys and `max_bytes` bytes, where
/// bytes_of(i) is key i's share of the frame.
template <typename BytesOf>
std::vector<Range> Split(size_t n, size_t max_keys, uint64_t max_bytes, BytesOf bytes_of) {
  std::vector<Range> out;
  size_t begin = 0;
  uint64_t bytes = 0;
  for (size_t i = 0; i < n; ++i) {
    const uint64_t b = bytes_of(i);
    if (i > begin && (i - begin >= max_keys || bytes + b > max_bytes)) {
      out.push_back({begin, i});
      begin = i;
      bytes = 0;
    }
    bytes += b;
  }
  if (n > begin) out.push_back({begin, n});  // an empty batch needs no frame at all
  return out;
}

/// The node refuses overlapping runs in a frame; a caller may legitimately pass one buffer
/// twice (the same bytes under two keys, or one destination for two keys): every run that
/// overlaps an earlier one travels inline instead.
void InlineOverlaps(std::vector<PeerBuffer>& runs, std::vector<size_t>& order) {
  order.clear();
  for (size_t i = 0; i < runs.size(); ++i) {
    if (runs[i].described() && runs[i].size > 0) order.push_back(i);
  }
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return runs[a].addr != runs[b].addr ? runs[a].addr < runs[b].addr : a < b;
  });
  uint64_t end = 0;
  bool any = false;
  for (size_t i : order) {
    if (any && runs[i].addr < end) {
      runs[i].addr = protocol::kInline;
      continue;
    }
    end = runs[i].addr + runs[i].size;
    any = true;
  }
}

/// Sends frames ahead of their replies, keeping at most `window` outstanding.
template <typename SendFn, typename RecvFn>
Status Pipeline(size_t frames, size_t window, SendFn send, RecvFn recv) {
  std::vector<uint64_t> ids(frames);
  size_t sent = 0;
  for (size_t done = 0; done < frames; ++done) {
    while (sent < frames && sent - done < window) {
      auto id = send(sent);
      if (!id.ok()) return id.status();
      ids[sent++] = id.value();
    }
    KVPOOL_RETURN_IF_ERROR(recv(done, ids[done]));
  }
  return Status::Ok();
}

}  // namespace

Client::Client(const ClientOptions& options) : options_(options) {}
Client::~Client() {
  idle_.clear();  // their queue pairs first, then the region they name
  if (rdma_device_ != nullptr && arena_mr_ != nullptr) rdma_device_->Deregister(*arena_mr_);
}

std::string Client::address() const { return options_.host + ":" + std::to_string(options_.port); }

Result<TransportChoice> ParseTransportChoice(std::string_view name) {
  if (name == "auto") return TransportChoice::kAuto;
  if (name == "tcp") return TransportChoice::kTcp;
  if (name == "shm") return TransportChoice::kShm;
  if (name == "rdma") return TransportChoice::kRdma;
  return Status(
      ErrorCode::kInvalidArgument,
      "transport must be 'auto', 'tcp', 'shm' or 'rdma', got '" + std::string(name) + "'");
}

Result<std::unique_ptr<Client>> Client::Connect(const ClientOptions& options) {
  KVPOOL_RETURN_IF_ERROR(ValidateRdmaOptions(options.rdma));
  std::unique_ptr<Client> client(new Client(options));
  const auto deadline = net::Deadline::In(
      std::chrono::milliseconds(std::min(options.timeout_ms, options.connect_timeout_ms)));
  auto conn = client->DialTcp(deadline);
  if (!conn.ok()) return conn.status();
  KVPOOL_RETURN_IF_ERROR(client->ChooseTransport(conn.value(), deadline));
  {
    std::lock_guard<std::mutex> lock(client->mu_);
    client->limits_ = conn.value()->limits;
    client->last_kind_ = conn.value()->kind;
  }
  client->Release(std::move(conn.value()));
  return client;
}

Status Client::ChooseTransport(std::unique_ptr<Connection>& tcp, net::Deadline deadline) {
  if (options_.transport == TransportChoice::kTcp) return Status::Ok();
  const bool offers_rdma =
      tcp->offers.find(static_cast<char>(TransportKind::kRdma)) != std::string::npos;
  const bool same_host = !tcp->shm_path.empty() && tcp->shm_host == LocalHostId();
  // RDMA when asked for, or (auto) when the node is on another host and offers it.
  if (options_.transport == TransportChoice::kRdma ||
      (options_.transport == TransportChoice::kAuto && !same_host && offers_rdma)) {
    Status why =
        offers_rdma ? Status::Ok()
                    : Status(ErrorCode::kUnsupported, "node " + address() + " does not serve RDMA");
    if (why.ok()) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        use_rdma_ = true;
      }
      auto rdma = DialRdma(deadline);
      if (rdma.ok()) {
        tcp = std::move(rdma.value());
        return Status::Ok();
      }
      why = rdma.status();
      std::lock_guard<std::mutex> lock(mu_);
      shm_retry_at_ = std::chrono::steady_clock::now() + kShmRetryAfter;
    }
    if (options_.transport == TransportChoice::kRdma) return why;
    NoteFallback(why);
    return Status::Ok();
  }
  Status why;
  if (tcp->shm_path.empty()) {
    why = Status(ErrorCode::kUnsupported,
                 "node " + address() + " does not serve shared memory" +
                     (tcp->limits.version < 2 ? " (it speaks protocol version 1)" : ""));
  } else if (tcp->shm_host != LocalHostId()) {
    why = Status(ErrorCode::kUnsupported, "node " + address() + " runs on another host (id " +
                                              tcp->shm_host + ", this host is " + LocalHostId() +
                                              ")");
  } else {
    {
      std::lock_guard<std::mutex> lock(mu_);
      use_shm_ = true;  // the node serves shared memory here: new connections try it
    }
    auto shm = DialShm(deadline);
    if (shm.ok()) {
      tcp = std::move(shm.value());  // the discovery connection closes; shared memory serves
      return Status::Ok();
    }
    why = shm.status();
    std::lock_guard<std::mutex> lock(mu_);
    shm_retry_at_ = std::chrono::steady_clock::now() + kShmRetryAfter;
  }
  if (options_.transport == TransportChoice::kShm) return why;
  NoteFallback(why);
  return Status::Ok();
}

void Client::NoteFallback(const Status& why) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (fallback_logged_) return;
    fallback_logged_ = true;
  }
  KVPOOL_LOG(kWarning, "shared memory or RDMA unavailable, using tcp", "node", address(), "reason",
             why.ToString());
}

Result<std::shared_ptr<StagingArena>> Client::EnsureArena() {
  std::lock_guard<std::mutex> lock(mu_);
  if (arena_ == nullptr) arena_ = options_.arena;
  if (arena_ == nullptr) {
    auto made = StagingArena::Create(options_.arena_bytes);
    if (!made.ok()) return made.status();
    arena_ = std::move(made.value());
  }
  return arena_;
}

Result<std::unique_ptr<Connection>> Client::DialTcp(net::Deadline deadline) {
  auto fd = net::Connect(options_.host, options_.port, deadline);
  if (!fd.ok()) return fd.status();
  auto conn = std::make_unique<Connection>(std::move(fd.value()), address(), options_.auth_token);
  KVPOOL_RETURN_IF_ERROR(conn->Hello(deadline));
  std::lock_guard<std::mutex> lock(mu_);
  node_id_ = conn->node_id;
  shm_path_ = conn->shm_path;
  return conn;
}

Result<std::unique_ptr<Connection>> Client::DialShm(net::Deadline deadline) {
  auto arena = EnsureArena();
  if (!arena.ok()) return arena.status();
  std::string path, node_id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    path = shm_path_;
    node_id = node_id_;
  }
  auto fd = net::ConnectUnix(path, deadline);
  if (!fd.ok()) return fd.status();
  // The arena goes only to a listener of this uid or root: any other process that got to bind
  // the advertised path (another user, another container) would gain access to it.
  auto listener = net::GetPeerCredentials(fd.value().get());
  if (!listener.ok()) return listener.status();
  if (listener.value().uid != geteuid() && listener.value().uid != 0) {
    return Status(ErrorCode::kUnauthorized,
                  "the socket " + path + " is served by uid " +
                      std::to_string(listener.value().uid) + ", neither this process's uid " +
                      std::to_string(geteuid()) + " nor root: the arena is not handed over");
  }
  auto conn = std::make_unique<Connection>(std::move(fd.value()), address() + " (" + path + ")",
                                           options_.auth_token);
  std::string offer(1, static_cast<char>(TransportKind::kShm));
  const uint64_t arena_bytes = arena.value()->size();
  offer.append(reinterpret_cast<const char*>(&arena_bytes), 8);
  KVPOOL_RETURN_IF_ERROR(conn->Hello(deadline, offer, arena.value()->fd()));
  if (conn->kind == TransportKind::kShm && conn->node_id != node_id) {
    // The node may have restarted since its last TCP HELLO: ask again which node serves there.
    auto tcp = DialTcp(deadline);
    if (tcp.ok()) node_id = tcp.value()->node_id;
  }
  if (conn->kind != TransportKind::kShm || conn->node_id != node_id) {
    // Same host id, but the socket at this path (in this process's mount namespace) answers as
    // another node, or a restarted one: the next TCP HELLO tells which.
    return Status(ErrorCode::kConnection,
                  "the socket " + path + " does not belong to node " + address());
  }
  conn->arena = arena.value().get();
  return conn;
}

Result<std::unique_ptr<Connection>> Client::DialRdma(net::Deadline deadline) {
  auto arena = EnsureArena();
  if (!arena.ok()) return arena.status();
  rdma::MemoryRegion mr;
  rdma::Device* device;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (rdma_device_ == nullptr) {
      auto opened = rdma::OpenDevice(options_.rdma);
      if (!opened.ok()) return opened.status();
      auto registered =
          opened.value()->Register(arena.value()->base(), arena.value()->size(),
                                   rdma::kLocalWrite | rdma::kRemoteRead | rdma::kRemoteWrite);
      if (!registered.ok()) return registered.status();
      rdma_device_ = std::move(opened.value());
      arena_mr_ = std::make_unique<rdma::MemoryRegion>(registered.value());
    }
    mr = *arena_mr_;
    device = rdma_device_.get();
  }
  auto qp = device->CreateQp(64);
  if (!qp.ok()) return qp.status();
  auto fd = net::Connect(options_.host, options_.port, deadline);
  if (!fd.ok()) return fd.status();
  auto conn = std::make_unique<Connection>(std::move(fd.value()), address() + " (rdma)",
                                           options_.auth_token);
  // The offer: our QP, and the arena as a region the node may READ and WRITE.
  std::string offer(1, static_cast<char>(TransportKind::kRdma));
  offer += rdma::EncodeQpAddress(qp.value()->address());
  offer.append(reinterpret_cast<const char*>(&mr.addr), 8);
  offer.append(reinterpret_cast<const char*>(&mr.length), 8);
  offer.append(reinterpret_cast<const char*>(&mr.rkey), 4);
  KVPOOL_RETURN_IF_ERROR(conn->Hello(deadline, offer));
  rdma::QpAddress node;
  if (conn->kind != TransportKind::kRdma) {
    return Status(ErrorCode::kUnsupported, "node " + address() + " answered the RDMA offer with " +
                                               TransportKindName(conn->kind));
  }
  if (!rdma::DecodeQpAddress(conn->answer, &node)) return conn->BadReply("RDMA answer");
  KVPOOL_RETURN_IF_ERROR(qp.value()->Connect(node));
  conn->qp = std::move(qp.value());
  conn->arena = arena.value().get();
  return conn;
}

Result<std::unique_ptr<Connection>> Client::Acquire(bool allow_idle) {
  bool shm, rdma;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (allow_idle && !idle_.empty()) {
      auto c = std::move(idle_.back());
      idle_.pop_back();
      last_kind_ = c->kind;
      return c;
    }
    const bool retry_due = std::chrono::steady_clock::now() >= shm_retry_at_;
    rdma = use_rdma_ && (options_.transport == TransportChoice::kRdma || retry_due);
    shm = !rdma && use_shm_ && (options_.transport == TransportChoice::kShm || retry_due);
  }
  const auto deadline = net::Deadline::In(
      std::chrono::milliseconds(std::min(options_.timeout_ms, options_.connect_timeout_ms)));
  Result<std::unique_ptr<Connection>> conn = Status(ErrorCode::kInternal, "no connection");
  Status shm_failed;
  if (shm || rdma) {
    conn = rdma ? DialRdma(deadline) : DialShm(deadline);
    if (!conn.ok()) {
      if (options_.transport != TransportChoice::kAuto) return conn.status();
      shm_failed = conn.status();  // this connection goes over TCP
    }
  }
  if (!conn.ok()) conn = DialTcp(deadline);
  if (!conn.ok()) return conn.status();  // the node is down: nothing learned about shm
  if (!shm_failed.ok()) NoteFallback(shm_failed);
  conn.value()->fresh = true;
  std::lock_guard<std::mutex> lock(mu_);
  // TCP works where shared memory did not: TCP for a while, then shared memory again.
  if (!shm_failed.ok()) shm_retry_at_ = std::chrono::steady_clock::now() + kShmRetryAfter;
  limits_ = conn.value()->limits;
  last_kind_ = conn.value()->kind;
  return conn;
}

void Client::Release(std::unique_ptr<Connection> conn) {
  std::lock_guard<std::mutex> lock(mu_);
  if (idle_.size() < options_.max_idle_connections) idle_.push_back(std::move(conn));
}

Status Client::WithConnection(const std::function<Status(Connection&)>& fn) {
  for (bool allow_idle : {true, false}) {
    auto conn = Acquire(allow_idle);
    if (!conn.ok()) return conn.status();
    Connection& c = *conn.value();
    const bool fresh = c.fresh;
    c.fresh = false;
    c.peer_writes = false;
    Status s = fn(c);
    if (s.ok()) {
      Release(std::move(conn.value()));
      return s;
    }
    if (c.peer_writes) {
      c.DrainUntilClosed(std::chrono::milliseconds(kDrainGraceMs));
    } else if (c.arena != nullptr) {
      shutdown(c.fd(), SHUT_RDWR);  // before the caller may reuse what the node was copying
    }
    // A pooled connection may have been closed by the node while idle (restart, idle reaping).
    // Every operation is idempotent (blocks are immutable), so one retry on a fresh connection
    // is safe; a fresh connection's failure is the node's answer.
    const bool stale = s.code() == ErrorCode::kClosed || s.code() == ErrorCode::kConnection;
    if (fresh || !stale) return s;
  }
  return Status(ErrorCode::kInternal, "unreachable");
}

Status Client::Put(std::span<const Key128> keys, std::span<const ConstBuffer> blocks,
                   std::span<uint8_t> statuses) {
  if (keys.size() != blocks.size()) {
    return Status(ErrorCode::kInvalidArgument, std::to_string(keys.size()) + " keys but " +
                                                   std::to_string(blocks.size()) + " blocks");
  }
  uint64_t bytes = 0;
  for (const auto& b : blocks) bytes += b.size;
  return InHalves(keys.size(), bytes, [&](size_t begin, size_t end) {
    return PutRange(keys.subspan(begin, end - begin), blocks.subspan(begin, end - begin),
                    statuses.subspan(begin, end - begin));
  });
}

Status Client::InHalves(size_t n, uint64_t bytes, const std::function<Status(size_t, size_t)>& fn) {
  // One connection moves a large batch at the speed of one copy per side; two connections let
  // the kernel's copies for both halves run on two cores (and two I/O threads on the node).
  if (n < 2 || bytes < kParallelBatchBytes) return fn(0, n);
  const size_t half = n / 2;
  Status second;
  std::thread t([&] { second = fn(half, n); });
  Status first = fn(0, half);
  t.join();
  return first.ok() ? second : first;
}

Status Client::PutRange(std::span<const Key128> keys, std::span<const ConstBuffer> blocks,
                        std::span<uint8_t> statuses) {
  const auto deadline = net::Deadline::In(std::chrono::milliseconds(options_.timeout_ms));
  return WithConnection([&](Connection& c) -> Status {
    for (size_t i = 0; i < blocks.size(); ++i) {
      if (blocks[i].size > c.limits.max_block_bytes ||
          blocks[i].size + protocol::kPutEntryBytes > c.limits.max_frame_bytes) {
        return Status(ErrorCode::kTooLarge,
                      "block " + std::to_string(i) + " of " + std::to_string(blocks[i].size) +
                          " bytes exceeds the node's max_block_bytes " +
                          std::to_string(c.limits.max_block_bytes) + " or max_frame_bytes " +
                          std::to_string(c.limits.max_frame_bytes));
      }
    }
    // On shared memory, blocks inside the arena travel as (offset, length): the node copies
    // them; the rest ride inline after the table.
    const bool described = c.arena != nullptr;
    const size_t entry_bytes =
        described ? protocol::kDescribedPutEntryBytes : protocol::kPutEntryBytes;
    c.peer.resize(keys.size());
    for (size_t i = 0; i < keys.size(); ++i) {
      const auto offset =
          described ? c.arena->Offset(blocks[i].data, blocks[i].size) : std::optional<uint64_t>();
      c.peer[i] = {offset.value_or(protocol::kInline), blocks[i].size};
    }
    if (described) InlineOverlaps(c.peer, c.order);
    // Described bytes count against max_frame_bytes as inline ones do (the node checks).
    const auto frames = Split(keys.size(), c.limits.max_batch_keys, c.limits.max_frame_bytes,
                              [&](size_t i) { return entry_bytes + blocks[i].size; });
    // Each in-flight frame needs its own table; they live in one buffer indexed by key.
    c.table.resize(keys.size() * entry_bytes);
    for (size_t i = 0; i < keys.size(); ++i) {
      uint8_t* e = c.table.data() + i * entry_bytes;
      std::memcpy(e, keys[i].bytes.data(), protocol::kKeyBytes);
      const uint64_t len = blocks[i].size;
      std::memcpy(e + protocol::kKeyBytes, &len, 8);
      if (described) std::memcpy(e + protocol::kKeyBytes + 8, &c.peer[i].addr, 8);
    }
    auto send = [&](size_t f) -> Result<uint64_t> {
      const Range r = frames[f];
      c.iov.assign(1, {nullptr, 0});
      c.iov.push_back({c.table.data() + r.begin * entry_bytes, (r.end - r.begin) * entry_bytes});
      uint64_t body = c.iov.back().iov_len;
      for (size_t i = r.begin; i < r.end; ++i) {
        if (c.peer[i].described()) continue;
        c.iov.push_back({const_cast<uint8_t*>(blocks[i].data), blocks[i].size});
        body += blocks[i].size;
      }
      const uint64_t id = c.SendFrameV(Op::kPut, static_cast<uint32_t>(r.end - r.begin), c.iov,
                                       body, deadline, described ? protocol::kFlagDescribed : 0);
      if (!c.send_status().ok()) return c.send_status();
      return id;
    };
    auto recv = [&](size_t f, uint64_t id) -> Status {
      const Range r = frames[f];
      Header h;
      KVPOOL_RETURN_IF_ERROR(c.ReadReplyHeader(Op::kPut, id, deadline, &h));
      if (h.count != r.end - r.begin || h.body_bytes != h.count)
        return c.BadReply("PUT reply size");
      return net::RecvAll(c.fd(), statuses.data() + r.begin, h.count, deadline);
    };
    return Pipeline(frames.size(), kPutWindow, send, recv);
  });
}

Status Client::Get(std::span<const Key128> keys,
                   const std::function<uint8_t*(size_t index, size_t size)>& dest,
                   std::span<uint8_t> found) {
  return GetImpl(keys, {}, dest, found);
}

Status Client::GetImpl(std::span<const Key128> keys, std::span<const MutableBuffer> buffers,
                       const std::function<uint8_t*(size_t index, size_t size)>& dest,
                       std::span<uint8_t> found) {
  auto on_reply = [&](Connection& c, size_t begin, const Header& h) -> Status {
    const size_t n = c.frame_keys;
    if (h.count != n || h.body_bytes < n * 8) return c.BadReply("GET reply size");
    c.lengths.resize(n);
    KVPOOL_RETURN_IF_ERROR(net::RecvAll(c.fd(), c.lengths.data(), n * 8, c.deadline));
    // On shared memory a block the node copied into its described run is not on the stream
    // (DeliveredInPeer: the run has exactly the block's size).
    auto in_peer = [&](size_t k, uint64_t len) {
      return !c.peer.empty() && DeliveredInPeer(c.peer[k], len);
    };
    uint64_t payload = 0;
    for (size_t i = 0; i < n; ++i) {
      if (c.lengths[i] != protocol::kMissing && !in_peer(begin + i, c.lengths[i])) {
        payload += c.lengths[i];
      }
    }
    if (h.body_bytes - n * 8 != payload)
      return c.BadReply("GET reply body does not match its lengths");
    // Consecutive destinations are filled by one readv; dropped blocks go through scratch.
    c.iov.clear();
    for (size_t i = 0; i < n; ++i) {
      const size_t k = begin + i;
      found[k] = 0;
      if (c.lengths[i] == protocol::kMissing) continue;
      if (in_peer(k, c.lengths[i])) {
        found[k] = 1;
        continue;
      }
      uint8_t* p = dest(k, c.lengths[i]);
      if (p != nullptr) {
        c.iov.push_back({p, c.lengths[i]});
        found[k] = 1;
        continue;
      }
      KVPOOL_RETURN_IF_ERROR(net::RecvAllV(c.fd(), c.iov.data(), c.iov.size(), c.deadline));
      c.iov.clear();
      auto& scratch = c.scratch();
      KVPOOL_RETURN_IF_ERROR(
          net::Discard(c.fd(), c.lengths[i], scratch.data(), scratch.size(), c.deadline));
    }
    return net::RecvAllV(c.fd(), c.iov.data(), c.iov.size(), c.deadline);
  };
  return KeyRequest(Op::kGet, keys, on_reply, buffers);
}

Status Client::GetInto(std::span<const Key128> keys, std::span<const MutableBuffer> buffers,
                       std::span<uint8_t> found) {
  if (keys.size() != buffers.size()) {
    return Status(ErrorCode::kInvalidArgument, std::to_string(keys.size()) + " keys but " +
                                                   std::to_string(buffers.size()) + " buffers");
  }
  uint64_t bytes = 0;
  for (const auto& b : buffers) bytes += b.size;
  return InHalves(keys.size(), bytes, [&](size_t begin, size_t end) {
    return GetImpl(
        keys.subspan(begin, end - begin), buffers.subspan(begin, end - begin),
        [&](size_t i, size_t size) {
          return size == buffers[begin + i].size ? buffers[begin + i].data : nullptr;
        },
        found.subspan(begin, end - begin));
  });
}

Status Client::KeyRequest(Op op, std::span<const Key128> keys,
                          const std::function<Status(detail::ClientConnection&, size_t begin,
                                                     const protocol::Header&)>& on_reply,
                          std::span<const MutableBuffer> buffers) {
  const auto deadline = net::Deadline::In(std::chrono::milliseconds(options_.timeout_ms));
  return WithConnection([&](Connection& c) -> Status {
    // GET on shared memory: entries name the arena runs to copy into (kInline for buffers
    // outside the arena).
    const bool described = c.arena != nullptr && !buffers.empty();
    const size_t entry_bytes = described ? protocol::kDescribedGetEntryBytes : protocol::kKeyBytes;
    c.peer_writes = described;
    c.peer.clear();
    if (described) {
      c.peer.resize(keys.size());
      c.table.resize(keys.size() * entry_bytes);
      for (size_t i = 0; i < keys.size(); ++i) {
        const auto offset = c.arena->Offset(buffers[i].data, buffers[i].size);
        c.peer[i] = {offset.value_or(protocol::kInline), buffers[i].size};
      }
      InlineOverlaps(c.peer, c.order);
      for (size_t i = 0; i < keys.size(); ++i) {
        uint8_t* e = c.table.data() + i * entry_bytes;
        std::memcpy(e, keys[i].bytes.data(), protocol::kKeyBytes);
        std::memcpy(e + protocol::kKeyBytes, &c.peer[i].addr, 8);
        std::memcpy(e + protocol::kKeyBytes + 8, &c.peer[i].size, 8);
      }
    }
    const auto frames = Split(keys.size(), c.limits.max_batch_keys, c.limits.max_frame_bytes,
                              [&](size_t) { return entry_bytes; });
    auto send = [&](size_t f) -> Result<uint64_t> {
      const Range r = frames[f];
      const void* body = described
                             ? static_cast<const void*>(c.table.data() + r.begin * entry_bytes)
                             : static_cast<const void*>(keys.data() + r.begin);
      const uint64_t id = c.SendFrame(op, static_cast<uint32_t>(r.end - r.begin), body,
                                      (r.end - r.begin) * entry_bytes, deadline,
                                      described ? protocol::kFlagDescribed : 0);
      if (!c.send_status().ok()) return c.send_status();
      return id;
    };
    auto recv = [&](size_t f, uint64_t id) -> Status {
      Header h;
      KVPOOL_RETURN_IF_ERROR(c.ReadReplyHeader(op, id, deadline, &h));
      c.deadline = deadline;
      c.frame_keys = frames[f].end - frames[f].begin;
      return on_reply(c, frames[f].begin, h);
    };
    return Pipeline(frames.size(), kQueryWindow, send, recv);
  });
}

Status Client::FlagRequest(Op op, std::span<const Key128> keys, std::span<uint8_t> flags) {
  return KeyRequest(op, keys, [&](Connection& c, size_t begin, const Header& h) -> Status {
    if (h.count != c.frame_keys || h.body_bytes != h.count) return c.BadReply("reply size");
    return net::RecvAll(c.fd(), flags.data() + begin, h.count, c.deadline);
  });
}

Status Client::Exists(std::span<const Key128> keys, std::span<uint8_t> present) {
  return FlagRequest(Op::kExists, keys, present);
}

Status Client::Delete(std::span<const Key128> keys, std::span<uint8_t> deleted) {
  return FlagRequest(Op::kDelete, keys, deleted);
}

Result<size_t> Client::MatchPrefix(std::span<const Key128> keys) {
  size_t matched = 0;
  bool broken = false;  // a frame matched only partly: later frames cannot extend the prefix
  Status s =
      KeyRequest(Op::kMatchPrefix, keys, [&](Connection& c, size_t, const Header& h) -> Status {
        if (h.body_bytes != 0 || h.count > c.frame_keys) return c.BadReply("MATCH_PREFIX reply");
        if (!broken) matched += h.count;
        broken = broken || h.count < c.frame_keys;
        return Status::Ok();
      });
  if (!s.ok()) return s;
  return matched;
}

Result<std::string> Client::StatsJson() {
  const auto deadline = net::Deadline::In(std::chrono::milliseconds(options_.timeout_ms));
  std::string out;
  Status s = WithConnection([&](Connection& c) -> Status {
    const uint64_t id = c.SendFrame(Op::kStats, 0, nullptr, 0, deadline);
    KVPOOL_RETURN_IF_ERROR(c.send_status());
    Header h;
    KVPOOL_RETURN_IF_ERROR(c.ReadReplyHeader(Op::kStats, id, deadline, &h));
    if (h.body_bytes > (1 << 20)) return c.BadReply("STATS reply size");
    out.resize(h.body_bytes);
    return net::RecvAll(c.fd(), out.data(), out.size(), deadline);
  });
  if (!s.ok()) return s;
  return out;
}

}  // namespace kvpool
