#include "kvpool/server.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <system_error>
#include <vector>

#include "support/auth.h"
#include "support/log.h"
#include "support/socket.h"
#include "transport/rdma/rdma_link.h"
#include "transport/rdma/verbs.h"
#include "transport/shm/shm_link.h"
#include "transport/tcp/tcp_link.h"

namespace kvpool {

using protocol::Header;
using protocol::Op;

struct Server::Connection {
  net::Fd fd;
  TransportKind listener = TransportKind::kTcp;  // the socket it arrived on
  std::thread thread;
  size_t shard = 0;  // which copy of the request counters it writes
  std::atomic<bool> done{false};
};

namespace {

/// A grow-only array of flags (std::vector<bool> packs bits and cannot back a span<bool>).
class FlagBuffer {
 public:
  std::span<bool> Get(size_t n) {
    if (n > capacity_) {
      data_ = std::make_unique<bool[]>(n);
      capacity_ = n;
    }
    return {data_.get(), n};
  }

 private:
  std::unique_ptr<bool[]> data_;
  size_t capacity_ = 0;
};

/// Serves one connection's frames in order. Buffers grow to the largest batch seen and are then
/// reused, so a steady stream of requests allocates nothing.
/// What a connection's handler needs to know about its node.
struct NodeFacts {
  const ServerOptions& options;
  const std::function<std::string()>& stats;
  const std::string& node_id;
  const std::string& shm_path;  ///< empty: shared memory not served
  std::array<Server::TransportCounters, kTransportKinds>& counters;
  std::atomic<uint64_t>& shm_mapped;  ///< arena bytes mapped by all connections
  rdma::Device* rdma_device;          ///< null: RDMA not served
  const rdma::MemoryRegion* rdma_pool;
  std::atomic<uint64_t>& auth_refused;
  Server::OpTable& ops;  ///< this connection's shard of the request counters
};

class FrameHandler {
 public:
  FrameHandler(int fd, TransportKind listener, BlockStore& store, const NodeFacts& node,
               std::string peer)
      : fd_(fd),
        peer_name_(std::move(peer)),
        listener_(listener),
        store_(store),
        options_(node.options),
        node_(node),
        link_(std::make_unique<TcpLink>(fd)),
        authed_(node.options.auth_tokens.empty()) {}
  ~FrameHandler() {
    link_.reset();  // unmaps the arena
    node_.shm_mapped.fetch_sub(mapped_);
  }
  FrameHandler(const FrameHandler&) = delete;
  FrameHandler& operator=(const FrameHandler&) = delete;

  /// Runs until the peer closes, a protocol error, or the socket is shut down.
  Status Run() {
    while (true) {
      uint8_t raw[protocol::kHeaderBytes];
      // Idle between frames may last forever; once a header starts, the frame is on the clock.
      Status s = ReadHeader(raw);
      if (s.code() == ErrorCode::kClosed && !in_frame_) return Status::Ok();
      if (!s.ok()) return s;
      const Header h = protocol::DecodeHeader(raw);
      const auto started = std::chrono::steady_clock::now();
      deadline_ = net::Deadline::In(std::chrono::milliseconds(options_.io_timeout_ms));
      op_bytes_ = 0;
      s = protocol::ValidateRequestHeader(h, options_.limits, version_);
      if (s.ok() && !hello_done_ && h.op != Op::kHello) {
        s = Status(ErrorCode::kHandshakeRequired, "the first frame must be HELLO");
      }
      if (s.ok() && hello_done_ && !authed_ && h.op != Op::kAuth) {
        s = RefuseAuth(h, "this node requires authentication: AUTH must follow HELLO");
        Count(h, false, started);
        return s;
      }
      if (!s.ok()) {
        s = ReplyError(h, s);
        Count(h, false, started);
        return s;
      }
      s = Dispatch(h);
      Count(h, s.ok(), started);
      if (!s.ok()) return s;
    }
  }

  /// The transport the connection is counted under (its listener's, or RDMA after HELLO).
  TransportKind link_kind() const { return counted_; }

  /// The peer may not use this socket: its HELLO is answered with `why`.
  void Refuse(Status why) { refused_ = std::move(why); }

  /// Sends an error reply for `h` (best effort) and returns the error so the caller closes.
  Status ReplyError(const Header& h, const Status& error) {
    Header reply;
    reply.op = protocol::IsKnownOp(static_cast<uint8_t>(h.op)) ? h.op : Op::kHello;
    reply.flags = protocol::kFlagError;
    reply.request_id = h.request_id;
    reply.status = static_cast<int32_t>(error.code());
    reply.body_bytes = error.message().size();
    uint8_t raw[protocol::kHeaderBytes];
    protocol::EncodeHeader(reply, raw);
    iovec iov[2] = {{raw, sizeof raw},
                    {const_cast<char*>(error.message().data()), error.message().size()}};
    (void)net::SendAll(fd_, iov, 2, net::Deadline::In(std::chrono::milliseconds(1000)));
    return error;
  }

 private:
  /// Answers `h` with Unauthorized, counts the refusal, and closes (the returned error).
  Status RefuseAuth(const Header& h, const std::string& why) {
    node_.auth_refused.fetch_add(1);
    KVPOOL_LOG(kInfo, "connection refused", "peer", peer_name_, "reason", why);
    return ReplyError(h, Status(ErrorCode::kUnauthorized, why));
  }

  /// Counts one request under its op and the connection's transport.
  void Count(const Header& h, bool ok, std::chrono::steady_clock::time_point started) {
    const auto op = static_cast<uint8_t>(h.op);
    Server::OpCounters& c =
        node_.ops[protocol::IsKnownOp(op) ? op : 0][static_cast<size_t>(counted_)];
    const auto us = static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(
                                              std::chrono::steady_clock::now() - started)
                                              .count());
    constexpr auto relaxed = std::memory_order_relaxed;
    c.requests.fetch_add(1, relaxed);
    if (ok) {
      c.keys.fetch_add(h.count, relaxed);
      c.bytes.fetch_add(op_bytes_, relaxed);
    } else {
      c.errors.fetch_add(1, relaxed);
    }
    c.latency_sum_us.fetch_add(us, relaxed);
    const auto& bounds = Server::kLatencyBoundsUs;
    const auto bucket = std::lower_bound(bounds.begin(), bounds.end(), us) - bounds.begin();
    c.latency[static_cast<size_t>(bucket)].fetch_add(1, relaxed);
  }

  Status ReadHeader(uint8_t* raw) {
    in_frame_ = false;
    // Wait for the first byte without a deadline (but an unauthenticated peer gets io_timeout
    // to send AUTH), then read the rest of the header on the clock.
    Status s = Recv(raw, 1,
                    hello_done_ && !authed_
                        ? net::Deadline::In(std::chrono::milliseconds(options_.io_timeout_ms))
                        : net::Deadline::Never());
    if (!s.ok()) return s;
    in_frame_ = true;
    return Recv(raw + 1, protocol::kHeaderBytes - 1,
                net::Deadline::In(std::chrono::milliseconds(options_.io_timeout_ms)));
  }

  /// Until HELLO is done on the shared-memory socket, reads keep the descriptors that arrive with
  /// the bytes (the client's arena rides with its HELLO); afterwards nothing passed is kept.
  Status Recv(void* buf, size_t n, net::Deadline deadline) {
    // A refused peer's descriptors are never taken (the kernel drops them unreceived).
    if (listener_ == TransportKind::kShm && !hello_done_ && refused_.ok()) {
      return net::RecvAllKeepFds(fd_, buf, n, deadline, &passed_fds_, 1, &fds_received_);
    }
    return net::RecvAll(fd_, buf, n, deadline);
  }

  Status Dispatch(const Header& h) {
    switch (h.op) {
      case Op::kHello:
        return Hello(h);
      case Op::kPut:
        return Put(h);
      case Op::kGet:
        return Get(h);
      case Op::kExists:
      case Op::kDelete:
      case Op::kMatchPrefix:
        return KeyQuery(h);
      case Op::kStats: {
        const std::string body = node_.stats();
        return Reply(h, 0, body.data(), body.size());
      }
      case Op::kAuth:
        return Auth(h);
    }
    return ReplyError(h, Status(ErrorCode::kUnknownOp, "unknown opcode"));
  }

  Status Reply(const Header& req, uint32_t count, const void* body, size_t body_bytes) {
    Header reply;
    reply.op = req.op;
    reply.request_id = req.request_id;
    reply.count = count;
    reply.body_bytes = body_bytes;
    uint8_t raw[protocol::kHeaderBytes];
    protocol::EncodeHeader(reply, raw);
    iovec iov[2] = {{raw, sizeof raw}, {const_cast<void*>(body), body_bytes}};
    return net::SendAll(fd_, iov, body_bytes ? 2 : 1, deadline_);
  }

  Status Hello(const Header& h) {
    hello_body_.resize(h.body_bytes);
    KVPOOL_RETURN_IF_ERROR(Recv(hello_body_.data(), hello_body_.size(), deadline_));
    if (!refused_.ok()) return ReplyError(h, refused_);
    uint32_t min_version, max_version;
    std::memcpy(&min_version, hello_body_.data(), 4);
    std::memcpy(&max_version, hello_body_.data() + 4, 4);
    const uint32_t speaks = options_.limits.version;
    const uint32_t version = std::min(max_version, speaks);
    if (version < std::max(min_version, protocol::kMinVersion)) {
      return ReplyError(
          h, Status(ErrorCode::kBadVersion,
                    "client speaks versions " + std::to_string(min_version) + ".." +
                        std::to_string(max_version) + ", node speaks " +
                        std::to_string(protocol::kMinVersion) + ".." + std::to_string(speaks)));
    }
    if (version < 2 && h.body_bytes != protocol::kHelloRequestBytes) {
      return ReplyError(h, Status(ErrorCode::kBadFrame, "HELLO extensions need version 2"));
    }
    // Extensions: the transport offer (unknown types are skipped, for newer clients).
    int offered = -1;
    uint64_t arena_bytes = 0;
    std::string rdma_offer;
    Status s = protocol::ForEachExt(
        std::span<const uint8_t>(hello_body_).subspan(protocol::kHelloRequestBytes),
        [&](uint16_t type, std::string_view value) -> Status {
          if (type == static_cast<uint16_t>(protocol::Ext::kAuth)) {
            if (value.size() != auth::kExtBytes || value[0] != auth::kHmacSha256) {
              return Status(ErrorCode::kBadFrame,
                            "auth extension must be 17 bytes, method 1 (HMAC-SHA256), nonce; got " +
                                std::to_string(value.size()) + " bytes");
            }
            client_nonce_ = value.substr(1);
            return Status::Ok();
          }
          if (type != static_cast<uint16_t>(protocol::Ext::kTransport)) return Status::Ok();
          if (value.empty()) return Status(ErrorCode::kBadFrame, "empty transport offer");
          offered = static_cast<uint8_t>(value[0]);
          if (offered == static_cast<int>(TransportKind::kShm)) {
            if (value.size() != 9) {
              return Status(ErrorCode::kBadFrame,
                            "shm offer must be 9 bytes, got " + std::to_string(value.size()));
            }
            std::memcpy(&arena_bytes, value.data() + 1, 8);
          }
          if (offered == static_cast<int>(TransportKind::kRdma)) rdma_offer = value.substr(1);
          return Status::Ok();
        });
    if (!s.ok()) return ReplyError(h, s);
    if (!authed_ && client_nonce_.empty()) {
      // Before any transport is set up: a peer without a token gets no arena mapped, no QP.
      return RefuseAuth(h,
                        "this node requires a data-plane auth token (set auth_token or "
                        "KVPOOL_AUTH_TOKEN on the client)");
    }
    if (listener_ == TransportKind::kShm) {
      if (offered != static_cast<int>(TransportKind::kShm) || fds_received_ != 1) {
        return ReplyError(h, Status(ErrorCode::kBadFrame,
                                    "the shared-memory socket needs a version 2 HELLO with an shm "
                                    "offer and exactly one descriptor, the arena's memfd (got " +
                                        std::to_string(fds_received_) + " descriptors, offer " +
                                        std::to_string(offered) + ")"));
      }
      const uint64_t cap = options_.shm_max_arena_bytes;
      if (arena_bytes > cap ||
          node_.shm_mapped.fetch_add(arena_bytes) + arena_bytes > options_.shm_max_mapped_bytes) {
        if (arena_bytes <= cap) node_.shm_mapped.fetch_sub(arena_bytes);
        return ReplyError(
            h, Status(ErrorCode::kInvalidArgument,
                      "shared-memory arena of " + std::to_string(arena_bytes) +
                          " bytes refused: shm_max_arena_bytes is " + std::to_string(cap) +
                          ", shm_max_mapped_bytes " +
                          std::to_string(options_.shm_max_mapped_bytes) + " for all clients"));
      }
      auto link = ShmLink::Open(fd_, passed_fds_[0].get(), arena_bytes);
      passed_fds_.clear();  // the mapping, not the descriptor, is what the link keeps
      if (!link.ok()) {
        node_.shm_mapped.fetch_sub(arena_bytes);
        return ReplyError(h, link.status());
      }
      mapped_ = arena_bytes;
      link_ = std::move(link.value());
    }
    std::string answer_extra;
    if (listener_ == TransportKind::kTcp && offered == static_cast<int>(TransportKind::kRdma) &&
        node_.rdma_device != nullptr && version >= 2) {
      // Anything that fails here answers tcp: the connection stays usable, the client falls back.
      Status why = AcceptRdma(rdma_offer, &answer_extra);
      if (why.ok()) {
        --node_.counters[static_cast<size_t>(TransportKind::kTcp)].connections;
        ++node_.counters[static_cast<size_t>(TransportKind::kRdma)].connections;
        ++node_.counters[static_cast<size_t>(TransportKind::kRdma)].accepted;
        counted_ = TransportKind::kRdma;
      } else {
        KVPOOL_LOG(kInfo, "RDMA offer answered with tcp", "reason", why.ToString());
        answer_extra.clear();
      }
    }
    // On TCP an offer of another kind is answered with the kind in use: tcp.
    version_ = version;
    hello_done_ = true;
    protocol::Limits limits = options_.limits;
    limits.version = version;
    std::string reply(protocol::kHelloReplyBytes, '\0');
    protocol::EncodeLimits(limits, reinterpret_cast<uint8_t*>(reply.data()));
    if (version >= 2) {
      std::string answer(1, static_cast<char>(link_->kind()));
      answer += answer_extra;
      protocol::AppendExt(reply, protocol::Ext::kTransport, answer);
      if (listener_ == TransportKind::kTcp) {
        std::string offers;
        if (!node_.shm_path.empty()) offers += static_cast<char>(TransportKind::kShm);
        if (node_.rdma_device != nullptr) offers += static_cast<char>(TransportKind::kRdma);
        protocol::AppendExt(reply, protocol::Ext::kTransports, offers);
      }
      protocol::AppendExt(reply, protocol::Ext::kNodeId, node_.node_id);
      if (!authed_) {
        node_nonce_ = auth::RandomNonce();
        protocol::AppendExt(reply, protocol::Ext::kAuth,
                            std::string(1, static_cast<char>(auth::kHmacSha256)) + node_nonce_);
      }
      if (listener_ == TransportKind::kTcp && !node_.shm_path.empty()) {
        const std::string& host = LocalHostId();
        std::string endpoint(2, '\0');
        const auto host_len = static_cast<uint16_t>(host.size());
        std::memcpy(endpoint.data(), &host_len, 2);
        endpoint += host;
        endpoint += node_.shm_path;
        protocol::AppendExt(reply, protocol::Ext::kShmEndpoint, endpoint);
      }
    }
    return Reply(h, 0, reply.data(), reply.size());
  }

  /// The client's proof over both nonces and the node id; the reply is the node's.
  Status Auth(const Header& h) {
    std::string proof(protocol::kAuthProofBytes, '\0');
    KVPOOL_RETURN_IF_ERROR(net::RecvAll(fd_, proof.data(), proof.size(), deadline_));
    if (authed_) {
      return ReplyError(h,
                        Status(ErrorCode::kBadFrame, options_.auth_tokens.empty()
                                                         ? "AUTH sent to a node without auth tokens"
                                                         : "AUTH sent twice on one connection"));
    }
    const int match = auth::MatchClientProof(options_.auth_tokens, proof, client_nonce_,
                                             node_nonce_, node_.node_id);
    if (match < 0) return RefuseAuth(h, "wrong data-plane auth token");
    authed_ = true;
    const std::string mine = auth::Proof(options_.auth_tokens[static_cast<size_t>(match)], "node",
                                         client_nonce_, node_nonce_, node_.node_id);
    return Reply(h, 0, mine.data(), mine.size());
  }

  Status ReadKeys(const Header& h) {
    keys_.resize(h.count);
    return net::RecvAll(fd_, keys_.data(), size_t{h.count} * protocol::kKeyBytes, deadline_);
  }

  Status Put(const Header& h) {
    const size_t n = h.count;
    const bool described = h.flags & protocol::kFlagDescribed;
    const size_t entry_bytes =
        described ? protocol::kDescribedPutEntryBytes : protocol::kPutEntryBytes;
    table_.resize(n * entry_bytes);
    KVPOOL_RETURN_IF_ERROR(net::RecvAll(fd_, table_.data(), table_.size(), deadline_));
    keys_.resize(n);
    sizes_.resize(n);
    peer_.resize(n);
    uint64_t payload = 0;  // bytes that follow the table on the stream
    for (size_t i = 0; i < n; ++i) {
      const uint8_t* e = table_.data() + i * entry_bytes;
      keys_[i] = Key128::FromBytes(e);
      PeerBuffer& p = peer_[i];
      std::memcpy(&p.size, e + protocol::kKeyBytes, 8);
      p.addr = protocol::kInline;
      if (described) std::memcpy(&p.addr, e + protocol::kKeyBytes + 8, 8);
      if (!p.described()) payload += std::min(p.size, options_.limits.max_frame_bytes);
    }
    if (h.body_bytes != table_.size() + payload) {
      return ReplyError(
          h, Status(ErrorCode::kBadFrame, "PUT body of " + std::to_string(h.body_bytes) +
                                              " bytes does not match its table (" +
                                              std::to_string(table_.size() + payload) + " bytes)"));
    }
    if (described) {
      KVPOOL_RETURN_IF_ERROR(CheckDescribed(h));
      // A described frame moves no more than an inline one may carry.
      uint64_t total = 0;
      for (const PeerBuffer& p : peer_) total += std::min(p.size, options_.limits.max_frame_bytes);
      if (total > options_.limits.max_frame_bytes) {
        return ReplyError(
            h, Status(ErrorCode::kFrameTooLarge,
                      "PUT names " + std::to_string(total) + " bytes, more than max_frame_bytes " +
                          std::to_string(options_.limits.max_frame_bytes)));
      }
      Status s = link_->CheckRuns(peer_);
      if (!s.ok()) return ReplyError(h, s);
    }
    results_.resize(n);
    reservations_.resize(n);
    status_.resize(n);
    for (size_t i = 0; i < n; ++i) {
      // Oversized blocks are refused per block (the store answers TooLarge for this size).
      sizes_[i] = peer_[i].size > options_.limits.max_block_bytes ? ~uint64_t{0} : peer_[i].size;
    }
    store_.Reserve(
        std::span<const Key128>(keys_.data(), n), std::span<const uint64_t>(sizes_.data(), n),
        std::span<PutResult>(results_.data(), n), std::span<Reservation>(reservations_.data(), n));
    // Payloads go straight into pool memory; refused ones are dropped.
    into_.resize(n);
    for (size_t i = 0; i < n; ++i) {
      const bool reserved = results_[i] == PutResult::kReserved;
      into_[i] = {reserved ? reservations_[i].data : nullptr, peer_[i].size};
    }
    Status s = link_->Pull(peer_, into_, deadline_);
    // Commit or abort every reservation, in one batch each.
    commit_keys_.clear();
    commit_res_.clear();
    for (size_t i = 0; i < n; ++i) {
      if (results_[i] != PutResult::kReserved) continue;
      commit_keys_.push_back(keys_[i]);
      commit_res_.push_back(reservations_[i]);
    }
    if (!s.ok()) {
      store_.Abort(commit_res_);
      return s;
    }
    const std::span<bool> committed = committed_.Get(commit_res_.size());
    store_.Commit(commit_keys_, commit_res_, committed);
    size_t c = 0;
    uint64_t moved = 0, copied = 0;
    for (size_t i = 0; i < n; ++i) {
      status_[i] = static_cast<uint8_t>(ToPutStatus(results_[i]));
      if (results_[i] != PutResult::kReserved) continue;
      moved += peer_[i].size;
      if (peer_[i].described()) copied += peer_[i].size;
      if (!committed[c++]) status_[i] = static_cast<uint8_t>(protocol::PutStatus::kExists);
    }
    op_bytes_ = moved;
    auto& counters = node_.counters[static_cast<size_t>(link_->kind())];
    counters.bytes_in += moved;
    counters.copied_in += copied;
    return Reply(h, static_cast<uint32_t>(n), status_.data(), n);
  }

  static protocol::PutStatus ToPutStatus(PutResult r) {
    switch (r) {
      case PutResult::kReserved:
        return protocol::PutStatus::kStored;
      case PutResult::kExists:
        return protocol::PutStatus::kExists;
      case PutResult::kNoSpace:
        return protocol::PutStatus::kNoSpace;
      case PutResult::kTooLarge:
        return protocol::PutStatus::kTooLarge;
    }
    return protocol::PutStatus::kNoSpace;
  }

  Status Get(const Header& h) {
    const size_t n = h.count;
    const bool described = h.flags & protocol::kFlagDescribed;
    keys_.resize(n);
    peer_.assign(n, PeerBuffer{});
    if (described) {
      KVPOOL_RETURN_IF_ERROR(CheckDescribed(h));
      table_.resize(n * protocol::kDescribedGetEntryBytes);
      KVPOOL_RETURN_IF_ERROR(net::RecvAll(fd_, table_.data(), table_.size(), deadline_));
      for (size_t i = 0; i < n; ++i) {
        const uint8_t* e = table_.data() + i * protocol::kDescribedGetEntryBytes;
        keys_[i] = Key128::FromBytes(e);
        std::memcpy(&peer_[i].addr, e + protocol::kKeyBytes, 8);
        std::memcpy(&peer_[i].size, e + protocol::kKeyBytes + 8, 8);
      }
      Status s = link_->CheckRuns(peer_);
      if (!s.ok()) return ReplyError(h, s);
    } else {
      KVPOOL_RETURN_IF_ERROR(ReadKeys(h));
    }
    pinned_.resize(n);
    const std::span<bool> found = found_.Get(n);
    lengths_.resize(n);
    blocks_.resize(n);
    store_.Pin(keys_, pinned_, found);
    unpin_.clear();
    uint64_t body = n * 8, moved = 0, copied = 0;
    for (size_t i = 0; i < n; ++i) {
      if (!found[i]) {
        lengths_[i] = protocol::kMissing;
        blocks_[i] = {nullptr, 0};
        continue;
      }
      lengths_[i] = pinned_[i].size;
      blocks_[i] = {pinned_[i].data, pinned_[i].size};
      if (DeliveredInPeer(peer_[i], pinned_[i].size)) {
        copied += pinned_[i].size;
      } else {
        body += pinned_[i].size;
      }
      moved += pinned_[i].size;
      unpin_.push_back(pinned_[i]);
    }
    Header reply;
    reply.op = h.op;
    reply.request_id = h.request_id;
    reply.count = static_cast<uint32_t>(n);
    reply.body_bytes = body;
    uint8_t raw[protocol::kHeaderBytes];
    protocol::EncodeHeader(reply, raw);
    const iovec head[2] = {{raw, sizeof raw}, {lengths_.data(), n * 8}};
    // The pins hold until the bytes are in the client's memory or on the socket.
    Status s = link_->Push(head, blocks_, peer_, deadline_);
    store_.Unpin(unpin_);
    if (s.ok()) {
      op_bytes_ = moved;
      auto& counters = node_.counters[static_cast<size_t>(link_->kind())];
      counters.bytes_out += moved;
      counters.copied_out += copied;
    }
    return s;
  }

  Status KeyQuery(const Header& h) {
    const size_t n = h.count;
    KVPOOL_RETURN_IF_ERROR(ReadKeys(h));
    if (h.op == Op::kMatchPrefix) {
      return Reply(h, static_cast<uint32_t>(store_.MatchPrefix(keys_)), nullptr, 0);
    }
    const std::span<bool> flags = found_.Get(n);
    if (h.op == Op::kExists) {
      store_.Contains(keys_, flags);
    } else {
      store_.Delete(keys_, flags);
    }
    status_.resize(n);
    for (size_t i = 0; i < n; ++i) status_[i] = flags[i] ? 1 : 0;
    return Reply(h, static_cast<uint32_t>(n), status_.data(), n);
  }

  /// Opens this connection's RDMA link for `offer` (QP address + arena region); `answer` gets
  /// the node's QP address.
  Status AcceptRdma(std::string_view offer, std::string* answer) {
    rdma::QpAddress client;
    if (offer.size() != rdma::kQpAddressBytes + rdma::kArenaRegionBytes ||
        !rdma::DecodeQpAddress(offer, &client)) {
      return Status(ErrorCode::kBadFrame,
                    "RDMA offer of " + std::to_string(offer.size()) + " bytes, expected " +
                        std::to_string(rdma::kQpAddressBytes + rdma::kArenaRegionBytes));
    }
    rdma::MemoryRegion arena;
    const char* p = offer.data() + rdma::kQpAddressBytes;
    std::memcpy(&arena.addr, p, 8);
    std::memcpy(&arena.length, p + 8, 8);
    std::memcpy(&arena.rkey, p + 16, 4);
    if (arena.length == 0 || arena.length > options_.shm_max_arena_bytes) {
      return Status(ErrorCode::kInvalidArgument,
                    "RDMA arena of " + std::to_string(arena.length) + " bytes refused");
    }
    auto qp = node_.rdma_device->CreateQp(64);
    if (!qp.ok()) return qp.status();
    KVPOOL_RETURN_IF_ERROR(qp.value()->Connect(client));
    *answer = rdma::EncodeQpAddress(qp.value()->address());
    link_ = std::make_unique<RdmaLink>(fd_, std::move(qp.value()), *node_.rdma_pool, arena,
                                       std::chrono::milliseconds(options_.io_timeout_ms));
    return Status::Ok();
  }

  /// True when `h` is described but this connection's link has no peer memory (BadFrame sent).
  Status CheckDescribed(const Header& h) {
    if (!(h.flags & protocol::kFlagDescribed) || link_->kind() != TransportKind::kTcp) {
      return Status::Ok();
    }
    return ReplyError(h, Status(ErrorCode::kBadFrame,
                                "a described frame on a tcp connection, which registered no peer "
                                "memory"));
  }

  int fd_;
  std::string peer_name_;  // for the log: "ip:port", or "unix" for the shared-memory socket
  TransportKind listener_;
  TransportKind counted_ = listener_;
  BlockStore& store_;
  const ServerOptions& options_;
  const NodeFacts& node_;
  std::unique_ptr<Link> link_;
  std::vector<net::Fd> passed_fds_;
  size_t fds_received_ = 0;
  uint64_t mapped_ = 0;  // arena bytes this connection maps (counted in NodeFacts::shm_mapped)
  Status refused_;
  bool hello_done_ = false;
  bool in_frame_ = false;
  uint32_t version_ = 0;
  uint64_t op_bytes_ = 0;  // payload bytes the current request moved (PUT stored, GET sent)
  bool authed_;            // true once AUTH passed, or when the node has no tokens
  std::string client_nonce_, node_nonce_;  // this connection's challenge
  net::Deadline deadline_ = net::Deadline::Never();
  std::vector<uint8_t> hello_body_, table_, status_;
  std::vector<Key128> keys_, commit_keys_;
  std::vector<uint64_t> sizes_, lengths_;
  std::vector<PeerBuffer> peer_;
  std::vector<MutableBuffer> into_;
  std::vector<ConstBuffer> blocks_;
  std::vector<PutResult> results_;
  std::vector<Reservation> reservations_, commit_res_;
  std::vector<PinnedBlock> pinned_, unpin_;
  FlagBuffer found_, committed_;
};

}  // namespace

namespace {

/// The default shared-memory socket: a directory of this uid's that nobody else can enter.
Result<std::string> DefaultShmSocket(const std::string& host, uint16_t port) {
  const char* runtime = std::getenv("XDG_RUNTIME_DIR");
  const std::string dir = std::string(runtime != nullptr && *runtime ? runtime : "/tmp") +
                          "/kvpool-" + std::to_string(geteuid());
  if (mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
    return Status(ErrorCode::kConnection, "cannot create " + dir + ": " + std::strerror(errno));
  }
  struct stat st{};
  if (lstat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != geteuid() ||
      (st.st_mode & 0077) != 0) {
    return Status(ErrorCode::kConnection,
                  dir + " must be a directory owned by uid " + std::to_string(geteuid()) +
                      " with mode 0700 (set shm_socket to place the socket elsewhere)");
  }
  return dir + "/node-" + host + "-" + std::to_string(port) + ".sock";
}

std::string JsonEscape(const std::string& in) {
  std::string out;
  for (const char c : in) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) >= 0x20) out += c;
  }
  return out;
}

/// The peer of a connected socket for the log: "ip:port", "[ip6]:port", or "unix".
std::string PeerName(int fd) {
  sockaddr_storage addr{};
  socklen_t len = sizeof addr;
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) return "?";
  char host[INET6_ADDRSTRLEN] = "?";
  if (addr.ss_family == AF_INET) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(&addr);
    inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
    return std::string(host) + ":" + std::to_string(ntohs(in->sin_port));
  }
  if (addr.ss_family == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(&addr);
    inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
    return "[" + std::string(host) + "]:" + std::to_string(ntohs(in6->sin6_port));
  }
  return "unix";
}

}  // namespace

Result<std::unique_ptr<Server>> Server::Start(const ServerOptions& options) {
  if (options.limits.max_batch_keys == 0 || options.limits.max_frame_bytes == 0) {
    return Status(ErrorCode::kInvalidArgument, "max_batch_keys and max_frame_bytes must be > 0");
  }
  if (options.limits.version < protocol::kMinVersion ||
      options.limits.version > protocol::kVersion) {
    return Status(ErrorCode::kInvalidArgument,
                  "protocol version " + std::to_string(options.limits.version) + " is not one of " +
                      std::to_string(protocol::kMinVersion) + ".." +
                      std::to_string(protocol::kVersion));
  }
  bool shm = false, want_rdma = false;
  for (TransportKind kind : options.transports) {
    shm = shm || kind == TransportKind::kShm;
    want_rdma = want_rdma || kind == TransportKind::kRdma;
  }
  KVPOOL_RETURN_IF_ERROR(ValidateRdmaOptions(options.rdma));
  if (shm && options.limits.version < 2) {
    return Status(ErrorCode::kInvalidArgument, "shared memory needs protocol version 2");
  }
  auto store = BlockStore::Create(options.store);
  if (!store.ok()) return store.status();
  auto fd = net::Listen(options.host, options.port, 512);
  if (!fd.ok()) return fd.status();
  const uint16_t port = net::LocalPort(fd.value().get());
  net::Fd shm_fd;
  std::string shm_path;
  if (shm) {
    auto path = options.shm_socket.empty() ? DefaultShmSocket(options.host, port)
                                           : Result<std::string>(options.shm_socket);
    auto listener = path.ok() ? net::ListenUnix(path.value(), 512) : Result<net::Fd>(path.status());
    if (listener.ok()) {
      shm_fd = std::move(listener.value());
      shm_path = path.value();
    } else if (!options.shm_socket.empty()) {
      return listener.status();  // asked for explicitly: a setting that cannot work is an error
    } else {
      KVPOOL_LOG(kWarning, "shared memory off: the default socket cannot be made", "reason",
                 listener.status().ToString());
    }
  }
  int wake[2];
  if (pipe2(wake, O_CLOEXEC | O_NONBLOCK) != 0) {
    return Status(ErrorCode::kInternal, std::string("pipe: ") + std::strerror(errno));
  }
  auto server = std::unique_ptr<Server>(
      new Server(options, std::move(store.value()), fd.value().Release(), port));
  server->shm_fd_ = shm_fd.Release();
  server->shm_path_ = shm_path;
  server->wake_[0] = wake[0];
  server->wake_[1] = wake[1];
  server->node_id_ = auth::RandomNonce();  // 16 random bytes, new at every start
  if (want_rdma && options.limits.version >= 2) {
    // No device is no error: the node says why, once, and serves TCP and shared memory.
    auto device = rdma::OpenDevice(options.rdma);
    Result<rdma::MemoryRegion> pool = Status(ErrorCode::kUnsupported, "");
    if (device.ok()) {
      pool = device.value()->Register(server->store_->pool().base(),
                                      server->store_->pool().capacity(), rdma::kLocalWrite);
    }
    if (device.ok() && pool.ok()) {
      server->rdma_device_ = std::move(device.value());
      server->rdma_pool_ = std::make_unique<rdma::MemoryRegion>(pool.value());
      KVPOOL_LOG(kInfo, "RDMA served", "device", server->rdma_device_->description());
    } else {
      // No device at all is the common case (info); a device that was asked for and cannot be
      // used is a misconfiguration worth a warning. Either way the node serves on.
      const Status why = device.ok() ? pool.status() : device.status();
      const bool asked = !options.rdma.devices.empty() || why.code() != ErrorCode::kUnsupported;
      if (asked) {
        KVPOOL_LOG(kWarning, "RDMA not served", "reason", why.ToString());
      } else {
        KVPOOL_LOG(kInfo, "RDMA not served", "reason", why.ToString());
      }
    }
  }
  server->accept_thread_ = std::thread([s = server.get()] { s->AcceptLoop(); });
  KVPOOL_LOG(kInfo, "server listening", "host", options.host, "port", port, "shm_socket",
             shm_path.empty() ? "off" : shm_path);
  return server;
}

Server::Server(const ServerOptions& options, std::unique_ptr<BlockStore> store, int listen_fd,
               uint16_t port)
    : options_(options),
      store_(std::move(store)),
      listen_fd_(listen_fd),
      port_(port),
      ops_(std::make_unique<std::array<OpTable, kOpShards>>()) {}

Server::~Server() { Stop(); }

void Server::AcceptLoop() {
  pollfd fds[3] = {{wake_[0], POLLIN, 0}, {listen_fd_, POLLIN, 0}, {shm_fd_, POLLIN, 0}};
  const nfds_t nfds = shm_fd_ >= 0 ? 3 : 2;
  while (!stopping_.load()) {
    if (poll(fds, nfds, -1) < 0 && errno != EINTR) return;
    if (fds[0].revents != 0 || stopping_.load()) return;
    for (nfds_t i = 1; i < nfds; ++i) {
      if (fds[i].revents == 0) continue;
      const int fd = accept4(fds[i].fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (fd < 0) {
        if (errno == EMFILE || errno == ENFILE) {
          KVPOOL_LOG(kWarning, "accept: out of file descriptors", "errno", errno);
          std::this_thread::sleep_for(std::chrono::milliseconds(50));
        }
        continue;  // EAGAIN (another wake-up took it), ECONNABORTED, EINTR
      }
      Admit(fd, i == 1 ? TransportKind::kTcp : TransportKind::kShm);
    }
  }
}

void Server::Admit(int fd, TransportKind listener) {
  ReapFinished();
  if (listener == TransportKind::kTcp) net::TuneDataSocket(fd);
  std::lock_guard<std::mutex> lock(conns_mu_);
  if (stopping_.load() || conns_.size() >= options_.max_connections) {
    ++rejected_;
    ::close(fd);
    return;
  }
  ++accepted_;
  ++per_transport_[static_cast<size_t>(listener)].accepted;
  ++per_transport_[static_cast<size_t>(listener)].connections;
  auto conn = std::make_unique<Connection>();
  conn->fd = net::Fd(fd);
  conn->listener = listener;
  conn->shard = accepted_.load() % kOpShards;
  Connection* c = conn.get();
  try {
    c->thread = std::thread([this, c] { Serve(c); });
  } catch (const std::system_error& e) {  // out of threads or address space: refuse, keep serving
    KVPOOL_LOG(kWarning, "cannot start a connection thread", "error", e.what());
    ++rejected_;
    --per_transport_[static_cast<size_t>(listener)].connections;
    return;  // conn (and its descriptor) goes here
  }
  conns_.push_back(std::move(conn));
}

void Server::Serve(Connection* conn) {
  const std::function<std::string()> stats = [this] { return StatsJson(); };
  const NodeFacts node{options_,           stats,
                       node_id_,           shm_path_,
                       per_transport_,     shm_mapped_,
                       rdma_device_.get(), rdma_pool_.get(),
                       auth_refused_,      (*ops_)[conn->shard]};
  const std::string peer = PeerName(conn->fd.get());
  FrameHandler handler(conn->fd.get(), conn->listener, *store_, node, peer);
  if (conn->listener == TransportKind::kShm) {
    // Only processes of this uid (or root, or the configured uids and gids) may hand the node
    // memory to copy into. A refused peer's HELLO is still read, so that it gets the reason.
    auto cred = net::GetPeerCredentials(conn->fd.get());
    const bool allowed =
        cred.ok() && (cred.value().uid == geteuid() || cred.value().uid == 0 ||
                      std::count(options_.shm_allow_uids.begin(), options_.shm_allow_uids.end(),
                                 cred.value().uid) > 0 ||
                      std::count(options_.shm_allow_gids.begin(), options_.shm_allow_gids.end(),
                                 cred.value().gid) > 0);
    if (!allowed) {
      handler.Refuse(Status(ErrorCode::kUnauthorized,
                            cred.ok() ? "uid " + std::to_string(cred.value().uid) + " (gid " +
                                            std::to_string(cred.value().gid) +
                                            ") may not use this node's shared-memory socket" +
                                            " (shm_allow_uids / shm_allow_gids)"
                                      : cred.status().message()));
    }
  }
  Status s = handler.Run();
  if (!s.ok() && !stopping_.load()) {
    if (s.code() >= ErrorCode::kProtocol) ++protocol_errors_;
    KVPOOL_LOG(kInfo, "connection closed", "transport", TransportKindName(conn->listener), "peer",
               peer, "reason", s.ToString());
  }
  shutdown(conn->fd.get(), SHUT_RDWR);
  --per_transport_[static_cast<size_t>(handler.link_kind())].connections;
  conn->done.store(true);
}

void Server::ReapFinished() {
  std::list<std::unique_ptr<Connection>> finished;
  {
    std::lock_guard<std::mutex> lock(conns_mu_);
    for (auto it = conns_.begin(); it != conns_.end();) {
      if ((*it)->done.load()) {
        finished.push_back(std::move(*it));
        it = conns_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& c : finished) c->thread.join();
}

void Server::Stop() {
  if (stopping_.exchange(true)) return;
  const char byte = 1;
  (void)!write(wake_[1], &byte, 1);
  if (accept_thread_.joinable()) accept_thread_.join();
  ::close(listen_fd_);
  if (shm_fd_ >= 0) {
    ::close(shm_fd_);
    unlink(shm_path_.c_str());
  }
  ::close(wake_[0]);
  ::close(wake_[1]);
  std::list<std::unique_ptr<Connection>> conns;
  {
    std::lock_guard<std::mutex> lock(conns_mu_);
    conns.swap(conns_);
  }
  // Shutting the sockets down wakes every I/O thread; each aborts its reservations and exits.
  for (auto& c : conns) shutdown(c->fd.get(), SHUT_RDWR);
  for (auto& c : conns) c->thread.join();
  if (rdma_device_ != nullptr && rdma_pool_ != nullptr) rdma_device_->Deregister(*rdma_pool_);
}

std::string Server::StatsJson() const {
  const BlockStoreStats s = store_->Stats();
  size_t connections;
  {
    std::lock_guard<std::mutex> lock(conns_mu_);
    connections = conns_.size();
  }
  std::ostringstream os;
  os << "{\"capacity_bytes\":" << s.capacity_bytes << ",\"used_bytes\":" << s.used_bytes
     << ",\"high_watermark_bytes\":" << s.high_watermark_bytes << ",\"entries\":" << s.entries
     << ",\"reserved_blocks\":" << s.reserved_blocks << ",\"pinned_blocks\":" << s.pinned_blocks
     << ",\"reserved_bytes\":" << s.reserved_bytes << ",\"pinned_bytes\":" << s.pinned_bytes
     << ",\"hits\":" << s.hits << ",\"misses\":" << s.misses << ",\"stored\":" << s.stored
     << ",\"existing\":" << s.existing << ",\"rejected\":" << s.rejected
     << ",\"evictions\":" << s.evictions << ",\"deletes\":" << s.deletes
     << ",\"bytes_in\":" << s.bytes_in << ",\"bytes_out\":" << s.bytes_out
     << ",\"connections\":" << connections << ",\"connections_accepted\":" << accepted_.load()
     << ",\"connections_rejected\":" << rejected_.load()
     << ",\"protocol_errors\":" << protocol_errors_.load()
     << ",\"auth_refused\":" << auth_refused_.load()
     << ",\"auth\":" << (options_.auth_tokens.empty() ? "false" : "true")
     << ",\"hugepages\":" << (store_->pool().hugepages() ? "true" : "false") << ",\"eviction\":\""
     << EvictionKindName(options_.store.eviction) << "\",\"shm_socket\":\"" << JsonEscape(shm_path_)
     << "\",\"transports\":{";
  bool first = true;
  for (TransportKind kind : {TransportKind::kTcp, TransportKind::kShm, TransportKind::kRdma}) {
    if (kind == TransportKind::kShm && shm_path_.empty()) continue;
    if (kind == TransportKind::kRdma && rdma_device_ == nullptr) continue;
    const TransportCounters& t = per_transport_[static_cast<size_t>(kind)];
    os << (first ? "" : ",") << "\"" << TransportKindName(kind)
       << "\":{\"connections\":" << t.connections.load() << ",\"accepted\":" << t.accepted.load()
       << ",\"bytes_in\":" << t.bytes_in.load() << ",\"bytes_out\":" << t.bytes_out.load()
       << ",\"copied_in\":" << t.copied_in.load() << ",\"copied_out\":" << t.copied_out.load()
       << "}";
    first = false;
  }
  os << "},\"latency_bounds_us\":[";
  for (size_t i = 0; i < kLatencyBoundsUs.size(); ++i) os << (i ? "," : "") << kLatencyBoundsUs[i];
  os << "],\"ops\":{";
  first = true;
  for (size_t op = 0; op < kOpSlots; ++op) {
    bool op_open = false;
    for (TransportKind kind : {TransportKind::kTcp, TransportKind::kShm, TransportKind::kRdma}) {
      // The sum over shards; a pair that saw no request is left out.
      const size_t t = static_cast<size_t>(kind);
      uint64_t requests = 0, errors = 0, keys = 0, bytes = 0, sum_us = 0;
      std::array<uint64_t, kLatencyBoundsUs.size() + 1> latency{};
      for (const OpTable& shard : *ops_) {
        const OpCounters& c = shard[op][t];
        requests += c.requests.load(std::memory_order_relaxed);
        errors += c.errors.load(std::memory_order_relaxed);
        keys += c.keys.load(std::memory_order_relaxed);
        bytes += c.bytes.load(std::memory_order_relaxed);
        sum_us += c.latency_sum_us.load(std::memory_order_relaxed);
        for (size_t b = 0; b < latency.size(); ++b) {
          latency[b] += c.latency[b].load(std::memory_order_relaxed);
        }
      }
      if (requests == 0) continue;
      os << (op_open ? ","
                     : std::string(first ? "" : ",") + "\"" +
                           protocol::OpName(static_cast<uint8_t>(op)) + "\":{")
         << "\"" << TransportKindName(kind) << "\":{\"requests\":" << requests
         << ",\"errors\":" << errors << ",\"keys\":" << keys << ",\"bytes\":" << bytes
         << ",\"latency_sum_us\":" << sum_us << ",\"latency\":[";
      for (size_t b = 0; b < latency.size(); ++b) os << (b ? "," : "") << latency[b];
      os << "]}";
      op_open = true;
      first = false;
    }
    if (op_open) os << "}";
  }
  os << "}}";
  return os.str();
}

}  // namespace kvpool
