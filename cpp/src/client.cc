#include "kvpool/client.h"

#include <algorithm>
#include <chrono>
#include <thread>

#include "support/socket.h"

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

struct Range {
  size_t begin, end;
};

}  // namespace

namespace detail {

class ClientConnection {
 public:
  ClientConnection(net::Fd fd, std::string where) : fd_(std::move(fd)), where_(std::move(where)) {}

  Status Hello(net::Deadline deadline, protocol::Limits* limits) {
    uint8_t body[protocol::kHelloRequestBytes];
    const uint32_t v = protocol::kVersion;
    std::memcpy(body, &v, 4);
    std::memcpy(body + 4, &v, 4);
    const uint64_t id = SendFrame(Op::kHello, 0, body, sizeof body, deadline);
    if (!send_status_.ok()) return send_status_;
    Header h;
    KVPOOL_RETURN_IF_ERROR(ReadReplyHeader(Op::kHello, id, deadline, &h));
    if (h.body_bytes != protocol::kHelloReplyBytes) return BadReply("HELLO reply size");
    uint8_t reply[protocol::kHelloReplyBytes];
    KVPOOL_RETURN_IF_ERROR(net::RecvAll(fd_.get(), reply, sizeof reply, deadline));
    *limits = protocol::DecodeLimits(reply);
    return Status::Ok();
  }

  /// Sends one frame made of the header and `iov` (which must leave iov[0] free for the header).
  uint64_t SendFrameV(Op op, uint32_t count, std::vector<iovec>& iov, uint64_t body_bytes,
                      net::Deadline deadline) {
    Header h;
    h.op = op;
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
                     net::Deadline deadline) {
    std::vector<iovec> iov = {{nullptr, 0}, {const_cast<void*>(body), body_bytes}};
    return SendFrameV(op, count, iov, body_bytes, deadline);
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
  // The frame whose reply is being read.
  net::Deadline deadline = net::Deadline::Never();
  size_t frame_keys = 0;
  bool fresh = false;       // connected for this call, not taken from the idle pool
  protocol::Limits limits;  // as announced by this connection's HELLO

 private:
  net::Fd fd_;
  std::string where_;
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
Client::~Client() = default;

std::string Client::address() const { return options_.host + ":" + std::to_string(options_.port); }

Result<std::unique_ptr<Client>> Client::Connect(const ClientOptions& options) {
  std::unique_ptr<Client> client(new Client(options));
  auto conn = client->Acquire(/*allow_idle=*/false);
  if (!conn.ok()) return conn.status();
  client->Release(std::move(conn.value()));
  return client;
}

Result<std::unique_ptr<Connection>> Client::Acquire(bool allow_idle) {
  if (allow_idle) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!idle_.empty()) {
      auto c = std::move(idle_.back());
      idle_.pop_back();
      return c;
    }
  }
  const auto deadline = net::Deadline::In(
      std::chrono::milliseconds(std::min(options_.timeout_ms, options_.connect_timeout_ms)));
  auto fd = net::Connect(options_.host, options_.port, deadline);
  if (!fd.ok()) return fd.status();
  auto conn = std::make_unique<Connection>(std::move(fd.value()), address());
  KVPOOL_RETURN_IF_ERROR(conn->Hello(deadline, &conn->limits));
  conn->fresh = true;
  std::lock_guard<std::mutex> lock(mu_);
  limits_ = conn->limits;
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
    Status s = fn(c);
    if (s.ok()) {
      Release(std::move(conn.value()));
      return s;
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
    const auto frames = Split(keys.size(), c.limits.max_batch_keys, c.limits.max_frame_bytes,
                              [&](size_t i) { return protocol::kPutEntryBytes + blocks[i].size; });
    // Each in-flight frame needs its own table; they live in one buffer indexed by key.
    c.table.resize(keys.size() * protocol::kPutEntryBytes);
    for (size_t i = 0; i < keys.size(); ++i) {
      uint8_t* e = c.table.data() + i * protocol::kPutEntryBytes;
      std::memcpy(e, keys[i].bytes.data(), protocol::kKeyBytes);
      const uint64_t len = blocks[i].size;
      std::memcpy(e + protocol::kKeyBytes, &len, 8);
    }
    auto send = [&](size_t f) -> Result<uint64_t> {
      const Range r = frames[f];
      c.iov.assign(1, {nullptr, 0});
      c.iov.push_back({c.table.data() + r.begin * protocol::kPutEntryBytes,
                       (r.end - r.begin) * protocol::kPutEntryBytes});
      uint64_t body = c.iov.back().iov_len;
      for (size_t i = r.begin; i < r.end; ++i) {
        c.iov.push_back({const_cast<uint8_t*>(blocks[i].data), blocks[i].size});
        body += blocks[i].size;
      }
      const uint64_t id =
          c.SendFrameV(Op::kPut, static_cast<uint32_t>(r.end - r.begin), c.iov, body, deadline);
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
  return KeyRequest(Op::kGet, keys, [&](Connection& c, size_t begin, const Header& h) -> Status {
    const size_t n = c.frame_keys;
    if (h.count != n || h.body_bytes < n * 8) return c.BadReply("GET reply size");
    c.lengths.resize(n);
    KVPOOL_RETURN_IF_ERROR(net::RecvAll(c.fd(), c.lengths.data(), n * 8, c.deadline));
    uint64_t payload = 0;
    for (size_t i = 0; i < n; ++i) {
      if (c.lengths[i] != protocol::kMissing) payload += c.lengths[i];
    }
    if (h.body_bytes - n * 8 != payload)
      return c.BadReply("GET reply body does not match its lengths");
    // Consecutive destinations are filled by one readv; dropped blocks go through scratch.
    c.iov.clear();
    for (size_t i = 0; i < n; ++i) {
      const size_t k = begin + i;
      found[k] = 0;
      if (c.lengths[i] == protocol::kMissing) continue;
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
  });
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
    return Get(
        keys.subspan(begin, end - begin),
        [&](size_t i, size_t size) {
          return size == buffers[begin + i].size ? buffers[begin + i].data : nullptr;
        },
        found.subspan(begin, end - begin));
  });
}

Status Client::KeyRequest(Op op, std::span<const Key128> keys,
                          const std::function<Status(detail::ClientConnection&, size_t begin,
                                                     const protocol::Header&)>& on_reply) {
  const auto deadline = net::Deadline::In(std::chrono::milliseconds(options_.timeout_ms));
  return WithConnection([&](Connection& c) -> Status {
    const auto frames = Split(keys.size(), c.limits.max_batch_keys, c.limits.max_frame_bytes,
                              [](size_t) { return protocol::kKeyBytes; });
    auto send = [&](size_t f) -> Result<uint64_t> {
      const Range r = frames[f];
      const uint64_t id =
          c.SendFrame(op, static_cast<uint32_t>(r.end - r.begin), keys.data() + r.begin,
                      (r.end - r.begin) * protocol::kKeyBytes, deadline);
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
