#include "kvpool/server.h"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <sstream>
#include <vector>

#include "support/log.h"
#include "support/socket.h"

namespace kvpool {

using protocol::Header;
using protocol::Op;

struct Server::Connection {
  net::Fd fd;
  std::thread thread;
  std::atomic<bool> done{false};
};

namespace {

constexpr size_t kScratchBytes = 256 << 10;

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
class FrameHandler {
 public:
  FrameHandler(int fd, BlockStore& store, const ServerOptions& options,
               const std::function<std::string()>& stats)
      : fd_(fd), store_(store), options_(options), stats_(stats) {}

  /// Runs until the peer closes, a protocol error, or the socket is shut down.
  Status Run() {
    while (true) {
      uint8_t raw[protocol::kHeaderBytes];
      // Idle between frames may last forever; once a header starts, the frame is on the clock.
      Status s = ReadHeader(raw);
      if (s.code() == ErrorCode::kClosed && !in_frame_) return Status::Ok();
      if (!s.ok()) return s;
      const Header h = protocol::DecodeHeader(raw);
      deadline_ = net::Deadline::In(std::chrono::milliseconds(options_.io_timeout_ms));
      s = protocol::ValidateRequestHeader(h, options_.limits);
      if (s.ok() && !hello_done_ && h.op != Op::kHello) {
        s = Status(ErrorCode::kHandshakeRequired, "the first frame must be HELLO");
      }
      if (!s.ok()) return ReplyError(h, s);
      s = Dispatch(h);
      if (!s.ok()) return s;
    }
  }

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
  Status ReadHeader(uint8_t* raw) {
    in_frame_ = false;
    // Wait for the first byte without a deadline, then read the rest of the header on the clock.
    Status s = net::RecvAll(fd_, raw, 1, net::Deadline::Never());
    if (!s.ok()) return s;
    in_frame_ = true;
    return net::RecvAll(fd_, raw + 1, protocol::kHeaderBytes - 1,
                        net::Deadline::In(std::chrono::milliseconds(options_.io_timeout_ms)));
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
        const std::string body = stats_();
        return Reply(h, 0, body.data(), body.size());
      }
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
    uint8_t body[protocol::kHelloRequestBytes];
    KVPOOL_RETURN_IF_ERROR(net::RecvAll(fd_, body, sizeof body, deadline_));
    uint32_t min_version, max_version;
    std::memcpy(&min_version, body, 4);
    std::memcpy(&max_version, body + 4, 4);
    if (min_version > protocol::kVersion || max_version < protocol::kVersion) {
      return ReplyError(h, Status(ErrorCode::kBadVersion,
                                  "client speaks versions " + std::to_string(min_version) + ".." +
                                      std::to_string(max_version) + ", node speaks " +
                                      std::to_string(protocol::kVersion)));
    }
    hello_done_ = true;
    uint8_t reply[protocol::kHelloReplyBytes];
    protocol::EncodeLimits(options_.limits, reply);
    return Reply(h, 0, reply, sizeof reply);
  }

  Status ReadKeys(const Header& h) {
    keys_.resize(h.count);
    return net::RecvAll(fd_, keys_.data(), size_t{h.count} * protocol::kKeyBytes, deadline_);
  }

  Status Put(const Header& h) {
    const size_t n = h.count;
    table_.resize(n * protocol::kPutEntryBytes);
    KVPOOL_RETURN_IF_ERROR(net::RecvAll(fd_, table_.data(), table_.size(), deadline_));
    keys_.resize(n);
    sizes_.resize(n);
    uint64_t payload = 0;
    for (size_t i = 0; i < n; ++i) {
      const uint8_t* e = table_.data() + i * protocol::kPutEntryBytes;
      keys_[i] = Key128::FromBytes(e);
      std::memcpy(&sizes_[i], e + protocol::kKeyBytes, 8);
      payload += std::min(sizes_[i], options_.limits.max_frame_bytes);  // cannot overflow
    }
    if (h.body_bytes != table_.size() + payload) {
      return ReplyError(
          h, Status(ErrorCode::kBadFrame, "PUT body of " + std::to_string(h.body_bytes) +
                                              " bytes does not match its table (" +
                                              std::to_string(table_.size() + payload) + " bytes)"));
    }
    results_.resize(n);
    reservations_.resize(n);
    status_.resize(n);
    for (size_t i = 0; i < n; ++i) {
      // Oversized blocks are refused per block (the store answers TooLarge for this size); their
      // bytes are read and dropped below.
      if (sizes_[i] > options_.limits.max_block_bytes) sizes_[i] = ~uint64_t{0};
    }
    store_.Reserve(
        std::span<const Key128>(keys_.data(), n), std::span<const uint64_t>(sizes_.data(), n),
        std::span<PutResult>(results_.data(), n), std::span<Reservation>(reservations_.data(), n));
    // Read payloads: reserved blocks straight into pool memory, the rest into scratch.
    Status s;
    for (size_t i = 0; i < n && s.ok(); ++i) {
      const uint64_t len = ReadLength(i);
      if (results_[i] == PutResult::kReserved) {
        s = net::RecvAll(fd_, reservations_[i].data, len, deadline_);
      } else {
        if (scratch_.empty()) scratch_.resize(kScratchBytes);
        s = net::Discard(fd_, len, scratch_.data(), scratch_.size(), deadline_);
      }
    }
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
    for (size_t i = 0; i < n; ++i) {
      switch (results_[i]) {
        case PutResult::kReserved:
          status_[i] = static_cast<uint8_t>(committed[c++] ? protocol::PutStatus::kStored
                                                           : protocol::PutStatus::kExists);
          break;
        case PutResult::kExists:
          status_[i] = static_cast<uint8_t>(protocol::PutStatus::kExists);
          break;
        case PutResult::kNoSpace:
          status_[i] = static_cast<uint8_t>(protocol::PutStatus::kNoSpace);
          break;
        case PutResult::kTooLarge:
          status_[i] = static_cast<uint8_t>(protocol::PutStatus::kTooLarge);
          break;
      }
    }
    return Reply(h, static_cast<uint32_t>(n), status_.data(), n);
  }

  // The bytes block i occupies on the wire (sizes_ holds ~0 for blocks refused as too large).
  uint64_t ReadLength(size_t i) const {
    uint64_t len;
    std::memcpy(&len, table_.data() + i * protocol::kPutEntryBytes + protocol::kKeyBytes, 8);
    return len;
  }

  Status Get(const Header& h) {
    const size_t n = h.count;
    KVPOOL_RETURN_IF_ERROR(ReadKeys(h));
    pinned_.resize(n);
    const std::span<bool> found = found_.Get(n);
    lengths_.resize(n);
    store_.Pin(keys_, pinned_, found);
    Header reply;
    reply.op = h.op;
    reply.request_id = h.request_id;
    reply.count = static_cast<uint32_t>(n);
    uint64_t body = n * 8;
    iov_.clear();
    iov_.push_back({nullptr, protocol::kHeaderBytes});
    iov_.push_back({lengths_.data(), n * 8});
    unpin_.clear();
    for (size_t i = 0; i < n; ++i) {
      if (!found[i]) {
        lengths_[i] = protocol::kMissing;
        continue;
      }
      lengths_[i] = pinned_[i].size;
      body += pinned_[i].size;
      iov_.push_back({const_cast<uint8_t*>(pinned_[i].data), pinned_[i].size});
      unpin_.push_back(pinned_[i]);
    }
    reply.body_bytes = body;
    uint8_t raw[protocol::kHeaderBytes];
    protocol::EncodeHeader(reply, raw);
    iov_[0].iov_base = raw;
    Status s = net::SendAll(fd_, iov_.data(), iov_.size(), deadline_);
    store_.Unpin(unpin_);
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

  int fd_;
  BlockStore& store_;
  const ServerOptions& options_;
  const std::function<std::string()>& stats_;
  bool hello_done_ = false;
  bool in_frame_ = false;
  net::Deadline deadline_ = net::Deadline::Never();
  std::vector<uint8_t> table_, scratch_, status_;
  std::vector<Key128> keys_, commit_keys_;
  std::vector<uint64_t> sizes_, lengths_;
  std::vector<PutResult> results_;
  std::vector<Reservation> reservations_, commit_res_;
  std::vector<PinnedBlock> pinned_, unpin_;
  FlagBuffer found_, committed_;
  std::vector<iovec> iov_;
};

}  // namespace

Result<std::unique_ptr<Server>> Server::Start(const ServerOptions& options) {
  if (options.limits.max_batch_keys == 0 || options.limits.max_frame_bytes == 0) {
    return Status(ErrorCode::kInvalidArgument, "max_batch_keys and max_frame_bytes must be > 0");
  }
  auto store = BlockStore::Create(options.store);
  if (!store.ok()) return store.status();
  auto fd = net::Listen(options.host, options.port, 512);
  if (!fd.ok()) return fd.status();
  const int raw = fd.value().Release();  // the Server owns the descriptor from here on
  const uint16_t port = net::LocalPort(raw);
  auto server = std::unique_ptr<Server>(new Server(options, std::move(store.value()), raw, port));
  server->accept_thread_ = std::thread([s = server.get()] { s->AcceptLoop(); });
  KVPOOL_LOG(kInfo, "server listening", "host", options.host, "port", port);
  return server;
}

Server::Server(const ServerOptions& options, std::unique_ptr<BlockStore> store, int listen_fd,
               uint16_t port)
    : options_(options), store_(std::move(store)), listen_fd_(listen_fd), port_(port) {}

Server::~Server() { Stop(); }

void Server::AcceptLoop() {
  while (!stopping_.load()) {
    const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) {
      if (stopping_.load()) return;
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (errno == EMFILE || errno == ENFILE) {
        KVPOOL_LOG(kWarning, "accept: out of file descriptors", "errno", errno);
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        continue;
      }
      if (errno == EINVAL) return;  // listener shut down
      continue;
    }
    ReapFinished();
    net::TuneDataSocket(fd);
    std::lock_guard<std::mutex> lock(conns_mu_);
    if (stopping_.load() || conns_.size() >= options_.max_connections) {
      ++rejected_;
      ::close(fd);
      continue;
    }
    ++accepted_;
    auto conn = std::make_unique<Connection>();
    conn->fd = net::Fd(fd);
    Connection* c = conn.get();
    conns_.push_back(std::move(conn));
    c->thread = std::thread([this, c] { Serve(c); });
  }
}

void Server::Serve(Connection* conn) {
  const std::function<std::string()> stats = [this] { return StatsJson(); };
  FrameHandler handler(conn->fd.get(), *store_, options_, stats);
  const Status s = handler.Run();
  if (!s.ok() && !stopping_.load()) {
    if (s.code() >= ErrorCode::kProtocol) ++protocol_errors_;
    KVPOOL_LOG(kInfo, "connection closed", "reason", s.ToString());
  }
  shutdown(conn->fd.get(), SHUT_RDWR);
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
  shutdown(listen_fd_, SHUT_RDWR);
  if (accept_thread_.joinable()) accept_thread_.join();
  ::close(listen_fd_);
  std::list<std::unique_ptr<Connection>> conns;
  {
    std::lock_guard<std::mutex> lock(conns_mu_);
    conns.swap(conns_);
  }
  // Shutting the sockets down wakes every I/O thread; each aborts its reservations and exits.
  for (auto& c : conns) shutdown(c->fd.get(), SHUT_RDWR);
  for (auto& c : conns) c->thread.join();
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
     << ",\"hits\":" << s.hits << ",\"misses\":" << s.misses << ",\"stored\":" << s.stored
     << ",\"existing\":" << s.existing << ",\"rejected\":" << s.rejected
     << ",\"evictions\":" << s.evictions << ",\"deletes\":" << s.deletes
     << ",\"bytes_in\":" << s.bytes_in << ",\"bytes_out\":" << s.bytes_out
     << ",\"connections\":" << connections << ",\"connections_accepted\":" << accepted_.load()
     << ",\"connections_rejected\":" << rejected_.load()
     << ",\"protocol_errors\":" << protocol_errors_.load()
     << ",\"hugepages\":" << (store_->pool().hugepages() ? "true" : "false") << ",\"eviction\":\""
     << EvictionKindName(options_.store.eviction) << "\"}";
  return os.str();
}

}  // namespace kvpool
