// libFuzzer target: arbitrary bytes through a real in-process kvpool::Server's frame handling
// (HELLO included), then the node's and its store's invariants. docs/fuzzing.md explains the
// modes and the checks.
//
// Input: byte 0 picks a mode (which node, and what the harness sends before the rest); the
// remaining bytes go to the node on one TCP connection, whose write side is then shut down. The
// harness reads every reply until the node closes, checks the replies' framing, waits until the
// node's I/O thread is done, then checks:
//  - no reservation and no pin is left (the frame's reservations were aborted or committed, every
//    GET dropped its pins), used bytes within the capacity and the high-water mark;
//  - the store's key set (its commit/removal events, mirrored here) matches its index: the entry
//    count, SnapshotKeys, and every key found by Contains (probe chains intact after deletions);
//  - a key is never committed twice without a removal between (blocks are immutable);
//  - the preloaded blocks: each one that was neither evicted nor deleted (no removal event) is
//    still there with exactly its bytes. One that was removed (the fuzzer may DELETE it, eviction
//    may take it: both legitimate) is deleted and put back with its canonical bytes;
//  - no frame of the input got a successful AUTH reply (no proof without the token), and on the
//    auth node nothing but HELLO is served to a connection that did not prove the token;
//  - the node still answers a fresh HELLO (+ AUTH) + STATS.
// A violation prints what broke and aborts, which libFuzzer reports as a crash.
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_set>
#include <vector>

#include "kvpool/block_store.h"
#include "kvpool/logging.h"
#include "kvpool/memory_pool.h"
#include "kvpool/protocol.h"
#include "kvpool/server.h"
#include "support/auth.h"

namespace {

using kvpool::BlockEvent;
using kvpool::Key128;
using kvpool::Server;
using kvpool::ServerOptions;
namespace protocol = kvpool::protocol;
using protocol::Header;
using protocol::Op;
using Clock = std::chrono::steady_clock;

constexpr auto kIoLimit = std::chrono::seconds(10);  // a node that takes longer is wedged
// Small, so that a few dozen inputs fill it: eviction, NoSpace and the high-water mark are
// reached all the time (the preloads and the fuzzer's blocks compete for 128 granules).
constexpr size_t kPoolBytes = size_t{512} << 10;
constexpr size_t kGranule = kvpool::MemoryPool::kGranule;
// The auth node accepts both (rotation); the harness proves the second.
const char* const kTokens[] = {"fuzz-token-old", "fuzz-token-new"};
constexpr uint8_t kClientNonce[16] = {'f', 'u', 'z', 'z', '-', 'c', 'l', 'i',
                                      'e', 'n', 't', 'n', 'o', 'n', 'c', 'e'};

[[noreturn]] __attribute__((format(printf, 1, 2))) void Fail(const char* fmt, ...) {
  std::fprintf(stderr, "frame_fuzzer: invariant violated: ");
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "\n");
  std::abort();
}

// ---- Preloaded blocks: tests/fuzz/make_seeds.py names the same keys. -------------------------
// Two share their low 64 bits (the index's home slot), so DELETEs exercise the probe chains.
struct Preload {
  const char key[17];
  size_t size;
};
constexpr Preload kPreloads[] = {
    {"preload-block-00", 64},
    {"preload-block-01", 4096},
    {"AAAAAAAAsamehome", 5000},
    {"BBBBBBBBsamehome", 0},
};
constexpr size_t kNumPreloads = sizeof kPreloads / sizeof kPreloads[0];

Key128 PreloadKey(size_t i) { return Key128::FromBytes(kPreloads[i].key); }
const std::string& PreloadBytes(size_t i) {
  static const std::vector<std::string> all = [] {
    std::vector<std::string> v;
    for (size_t p = 0; p < kNumPreloads; ++p) {
      std::string bytes(kPreloads[p].size, '\0');
      for (size_t j = 0; j < bytes.size(); ++j) bytes[j] = static_cast<char>(p * 131 + j * 7 + 3);
      v.push_back(std::move(bytes));
    }
    return v;
  }();
  return all[i];
}

/// Key equality without memcmp (which libFuzzer intercepts and records, at a cost per call).
struct KeyEq {
  bool operator()(const Key128& a, const Key128& b) const {
    uint64_t x[2], y[2];
    std::memcpy(x, a.bytes.data(), 16);
    std::memcpy(y, b.bytes.data(), 16);
    return x[0] == y[0] && x[1] == y[1];
  }
};
using KeySet = std::unordered_set<Key128, std::hash<Key128>, KeyEq>;

// ---- The nodes. ------------------------------------------------------------------------------
enum NodeIndex { kOpen = 0, kAuth = 1, kV1 = 2, kNumNodes = 3 };

struct Node {
  const char* name;
  std::unique_ptr<Server> server;
  bool auth = false;
  uint32_t version = 2;
  protocol::Limits limits;
  KeySet keys;  // the store's committed keys, as its events tell them
};
Node* g_nodes = nullptr;  // never freed: the servers serve until the process exits

ServerOptions NodeOptions(NodeIndex which) {
  ServerOptions o;
  o.host = "127.0.0.1";
  o.port = 0;
  o.store.capacity = kPoolBytes;
  o.store.hugepages = kvpool::HugePages::kOff;
  o.store.event_capacity = size_t{1} << 16;  // far more than one input can cause
  // Small limits, so that every refusal (batch, frame, block too large) is reachable with short
  // inputs, and no frame can claim more than the pool holds.
  o.limits.max_batch_keys = 64;
  o.limits.max_frame_bytes = 64 << 10;
  o.limits.max_block_bytes = 6000;  // a PUT entry above it is answered TooLarge
  o.limits.version = which == kV1 ? 1 : 2;
  o.io_timeout_ms = 200;  // a frame cut short ends at EOF anyway; this bounds anything else
  o.max_connections = 16;
  o.transports = {kvpool::TransportKind::kTcp};
  if (which == kAuth) o.auth_tokens = {kTokens[0], kTokens[1]};
  return o;
}

// ---- Sockets (blocking on poll with a deadline; any failure to make progress is a hang). -----
struct Socket {
  int fd = -1;
  explicit Socket(uint16_t port) {
    fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) Fail("socket: %s", std::strerror(errno));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
      // libFuzzer's SIGALRM (its -timeout check) may interrupt the handshake, which goes on.
      if (errno != EINTR) Fail("connect to port %u: %s", port, std::strerror(errno));
      WaitFor(POLLOUT, Clock::now() + kIoLimit, "connect");
      int error = 0;
      socklen_t len = sizeof error;
      if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &len) != 0 || error != 0) {
        Fail("connect to port %u: %s", port, std::strerror(error));
      }
    }
    const int one = 1;  // no Nagle: a small request must not wait for the node's delayed ACK
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  ~Socket() { close(fd); }
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;

  void WaitFor(short events, Clock::time_point deadline, const char* what) const {
    while (true) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      if (left.count() <= 0) Fail("node did not respond within 10 s (%s)", what);
      pollfd p{fd, events, 0};
      const int r = poll(&p, 1, static_cast<int>(left.count()));
      if (r > 0) return;
      if (r < 0 && errno != EINTR) Fail("poll: %s", std::strerror(errno));
    }
  }
  /// Writes everything or fails (for the harness's own frames, which the node must take).
  void SendAll(std::string_view bytes) const {
    const auto deadline = Clock::now() + kIoLimit;
    while (!bytes.empty()) {
      WaitFor(POLLOUT, deadline, "send");
      const ssize_t n = send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) {
        bytes.remove_prefix(static_cast<size_t>(n));
      } else if (errno != EAGAIN && errno != EINTR) {
        Fail("send: %s", std::strerror(errno));
      }
    }
  }
  void RecvExact(void* buf, size_t n, const char* what) const {
    const auto deadline = Clock::now() + kIoLimit;
    auto* p = static_cast<uint8_t*>(buf);
    while (n > 0) {
      WaitFor(POLLIN, deadline, what);
      const ssize_t got = recv(fd, p, n, MSG_DONTWAIT);
      if (got > 0) {
        p += got;
        n -= static_cast<size_t>(got);
      } else if (got == 0) {
        Fail("node closed the connection during %s", what);
      } else if (errno != EAGAIN && errno != EINTR) {
        Fail("recv during %s: %s", what, std::strerror(errno));
      }
    }
  }
  /// One reply frame of the harness's own requests; it must not be an error.
  std::string ReadReply(Op op, const char* what) const {
    uint8_t raw[protocol::kHeaderBytes];
    RecvExact(raw, sizeof raw, what);
    const Header h = protocol::DecodeHeader(raw);
    if (h.magic != protocol::kMagic || h.op != op || h.body_bytes > (1 << 20)) {
      Fail("bad reply header to %s (op %u, body %llu)", what, static_cast<unsigned>(h.op),
           static_cast<unsigned long long>(h.body_bytes));
    }
    std::string body(h.body_bytes, '\0');
    RecvExact(body.data(), body.size(), what);
    if (h.flags != 0) Fail("error reply %d to %s: %s", h.status, what, body.c_str());
    return body;
  }
  /// Sends `bytes` (as much as the node takes), shuts the write side down and returns every byte
  /// the node sends until it closes. The node must close: it has our EOF.
  /// `chunk` > 0: at most that many bytes per send, with a pause after each, so that the node
  /// sees headers, tables and payloads arrive in pieces.
  std::string Exchange(std::string_view bytes, size_t chunk = 0) const {
    std::string in;
    const auto deadline = Clock::now() + kIoLimit;
    bool writing = true;
    if (bytes.empty()) {
      shutdown(fd, SHUT_WR);
      writing = false;
    }
    char buf[64 << 10];
    while (true) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      if (left.count() <= 0) Fail("node did not close the connection within 10 s of our EOF");
      pollfd p{fd, static_cast<short>(POLLIN | (writing ? POLLOUT : 0)), 0};
      if (poll(&p, 1, static_cast<int>(left.count())) < 0) {
        if (errno == EINTR) continue;
        Fail("poll: %s", std::strerror(errno));
      }
      if (writing && (p.revents & (POLLOUT | POLLERR | POLLHUP))) {
        const size_t want = chunk > 0 ? std::min(chunk, bytes.size()) : bytes.size();
        const ssize_t n = send(fd, bytes.data(), want, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) bytes.remove_prefix(static_cast<size_t>(n));
        if (n > 0 && chunk > 0) std::this_thread::sleep_for(std::chrono::microseconds(50));
        if ((n < 0 && errno != EAGAIN && errno != EINTR) || bytes.empty()) {
          shutdown(fd, SHUT_WR);  // done, or the node stopped reading (it closed): EPIPE
          writing = false;
        }
      }
      if (p.revents & (POLLIN | POLLERR | POLLHUP)) {
        const ssize_t got = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
        if (got > 0) {
          in.append(buf, static_cast<size_t>(got));
        } else if (got == 0 || (errno != EAGAIN && errno != EINTR)) {
          return in;  // EOF, or a reset (the node closed with our bytes unread)
        }
      }
    }
  }
};

std::string Frame(Op op, uint64_t request_id, std::string_view body) {
  Header h;
  h.op = op;
  h.request_id = request_id;
  h.body_bytes = body.size();
  std::string out(protocol::kHeaderBytes, '\0');
  protocol::EncodeHeader(h, reinterpret_cast<uint8_t*>(out.data()));
  out += body;
  return out;
}

std::string HelloBody(uint32_t min_version, uint32_t max_version) {
  std::string body(protocol::kHelloRequestBytes, '\0');
  std::memcpy(body.data(), &min_version, 4);
  std::memcpy(body.data() + 4, &max_version, 4);
  return body;
}

/// The node's auth nonce from a HELLO reply body (empty when it sent none).
std::string NodeNonce(const std::string& reply) {
  std::string nonce;
  const auto ext =
      std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(reply.data()), reply.size())
          .subspan(protocol::kHelloReplyBytes);
  const kvpool::Status s = protocol::ForEachExt(ext, [&](uint16_t type, std::string_view value) {
    if (type == static_cast<uint16_t>(protocol::Ext::kAuth) &&
        value.size() == kvpool::auth::kExtBytes) {
      nonce = std::string(value.substr(1));
    }
    return kvpool::Status::Ok();
  });
  if (!s.ok()) Fail("the node's HELLO reply has bad extensions: %s", s.ToString().c_str());
  return nonce;
}

/// A v2 HELLO carrying the client nonce, then AUTH with the proof of kTokens[1]; checks the
/// node's proof.
void Authenticate(const Socket& sock, const Node& node) {
  std::string body = HelloBody(2, 2);
  std::string value(1, static_cast<char>(kvpool::auth::kHmacSha256));
  value.append(reinterpret_cast<const char*>(kClientNonce), sizeof kClientNonce);
  protocol::AppendExt(body, protocol::Ext::kAuth, value);
  sock.SendAll(Frame(Op::kHello, 0xF022'0001, body));
  const std::string reply = sock.ReadReply(Op::kHello, "the harness's HELLO");
  const std::string node_nonce = NodeNonce(reply);
  if (node_nonce.size() != kvpool::auth::kNonceBytes) Fail("the auth node sent no nonce");
  const std::string_view client_nonce(reinterpret_cast<const char*>(kClientNonce),
                                      sizeof kClientNonce);
  const std::string& node_id = node.server->node_id();
  sock.SendAll(Frame(Op::kAuth, 0xF022'0002,
                     kvpool::auth::Proof(kTokens[1], "client", client_nonce, node_nonce, node_id)));
  const std::string proof = sock.ReadReply(Op::kAuth, "the harness's AUTH");
  if (proof != kvpool::auth::Proof(kTokens[1], "node", client_nonce, node_nonce, node_id)) {
    Fail("the auth node's proof is wrong");
  }
}

// ---- Checks. ---------------------------------------------------------------------------------
uint64_t JsonField(const std::string& json, const std::string& prefix) {
  const size_t at = json.find(prefix);
  if (at == std::string::npos) Fail("STATS has no %s: %s", prefix.c_str(), json.c_str());
  return std::strtoull(json.c_str() + at + prefix.size(), nullptr, 10);
}

/// Waits until the node's TCP I/O threads are all done (each aborted or committed its frame's
/// reservations and dropped its pins before it counts itself out).
void WaitIdle(const Node& node) {
  const auto deadline = Clock::now() + kIoLimit;
  while (JsonField(node.server->StatsJson(), "\"tcp\":{\"connections\":") != 0) {
    if (Clock::now() > deadline) Fail("%s: a connection thread did not finish in 10 s", node.name);
    std::this_thread::sleep_for(std::chrono::microseconds(20));  // leave the core to the node
  }
}

/// The framing of every complete reply in `in` (a reset may cut the tail short).
void CheckReplies(const Node& node, const std::string& in, bool authed) {
  size_t at = 0;
  bool errored = false;
  while (in.size() - at >= protocol::kHeaderBytes) {
    const Header h = protocol::DecodeHeader(reinterpret_cast<const uint8_t*>(in.data() + at));
    const auto op = static_cast<uint8_t>(h.op);
    if (h.magic != protocol::kMagic || !protocol::IsKnownOp(op) || h.reserved != 0) {
      Fail("%s: reply at byte %zu has magic %08x op %u reserved %u", node.name, at, h.magic, op,
           h.reserved);
    }
    if (errored) Fail("%s: a reply follows an error reply (the node must close)", node.name);
    if (h.body_bytes > in.size() - at - protocol::kHeaderBytes) break;  // cut short
    const auto* body = reinterpret_cast<const uint8_t*>(in.data() + at + protocol::kHeaderBytes);
    const uint64_t n = h.body_bytes;
    at += protocol::kHeaderBytes + n;
    if (h.flags == protocol::kFlagError) {
      errored = true;
      const bool known = h.status == static_cast<int32_t>(kvpool::ErrorCode::kInvalidArgument) ||
                         (h.status >= static_cast<int32_t>(kvpool::ErrorCode::kBadMagic) &&
                          h.status <= static_cast<int32_t>(kvpool::ErrorCode::kUnauthorized));
      if (!known || h.count != 0) {
        Fail("%s: error reply with status %d count %u", node.name, h.status, h.count);
      }
      continue;
    }
    if (h.flags != 0 || h.status != 0) {
      Fail("%s: reply with flags %u status %d", node.name, h.flags, h.status);
    }
    if (node.auth && !authed && h.op != Op::kHello) {
      Fail("%s: op %u served on a connection that proved no token", node.name, op);
    }
    if (h.count > node.limits.max_batch_keys) Fail("%s: reply count %u", node.name, h.count);
    switch (h.op) {
      case Op::kHello: {
        protocol::Limits l;
        if (n < protocol::kHelloReplyBytes ||
            (l = protocol::DecodeLimits(body)).version < protocol::kMinVersion ||
            l.version > node.version || (l.version == 1 && n != protocol::kHelloReplyBytes) ||
            l.max_batch_keys != node.limits.max_batch_keys) {
          Fail("%s: bad HELLO reply of %llu bytes", node.name, static_cast<unsigned long long>(n));
        }
        bool tcp = l.version == 1;
        const kvpool::Status s =
            protocol::ForEachExt(std::span<const uint8_t>(body + protocol::kHelloReplyBytes,
                                                          n - protocol::kHelloReplyBytes),
                                 [&](uint16_t type, std::string_view value) {
                                   if (type == static_cast<uint16_t>(protocol::Ext::kTransport)) {
                                     tcp = value.size() == 1 && value[0] == 0;
                                   }
                                   if (type == static_cast<uint16_t>(protocol::Ext::kNodeId) &&
                                       value != node.server->node_id()) {
                                     Fail("%s: HELLO reply names another node id", node.name);
                                   }
                                   return kvpool::Status::Ok();
                                 });
        if (!s.ok() || !tcp) Fail("%s: HELLO reply extensions: %s", node.name, s.message().c_str());
        break;
      }
      case Op::kPut:
        for (uint64_t i = 0; i < n; ++i) {
          if (body[i] > static_cast<uint8_t>(protocol::PutStatus::kTooLarge)) {
            Fail("%s: PUT status %u", node.name, body[i]);
          }
        }
        if (n != h.count)
          Fail("%s: PUT reply of %u statuses in %llu bytes", node.name, h.count,
               static_cast<unsigned long long>(n));
        break;
      case Op::kGet: {
        if (n < uint64_t{8} * h.count) Fail("%s: GET reply shorter than its lengths", node.name);
        uint64_t payload = 0;
        for (uint32_t i = 0; i < h.count; ++i) {
          uint64_t len;
          std::memcpy(&len, body + 8 * i, 8);
          if (len == protocol::kMissing) continue;
          if (len > node.limits.max_block_bytes)
            Fail("%s: GET length %llu", node.name, static_cast<unsigned long long>(len));
          payload += len;
        }
        if (n != uint64_t{8} * h.count + payload) {
          Fail("%s: GET reply of %llu bytes, its lengths say %llu", node.name,
               static_cast<unsigned long long>(n),
               static_cast<unsigned long long>(8 * h.count + payload));
        }
        break;
      }
      case Op::kExists:
      case Op::kDelete:
        for (uint64_t i = 0; i < n; ++i) {
          if (body[i] > 1) Fail("%s: flag %u in an EXISTS/DELETE reply", node.name, body[i]);
        }
        if (n != h.count) Fail("%s: EXISTS/DELETE reply size", node.name);
        break;
      case Op::kMatchPrefix:
        if (n != 0) Fail("%s: MATCH_PREFIX reply with a body", node.name);
        break;
      case Op::kStats:
        if (n < 2 || body[0] != '{' || body[n - 1] != '}') Fail("%s: STATS reply", node.name);
        break;
      case Op::kAuth:
        Fail("%s: AUTH succeeded for bytes that hold no token", node.name);
    }
  }
}

/// Applies the store's pending events to the mirror; returns which preloaded keys were removed.
/// An overflowed event ring (never expected) resynchronises and treats every preload as removed.
std::vector<bool> DrainEvents(Node& node) {
  std::vector<bool> removed(kNumPreloads, false);
  std::vector<BlockEvent> events;
  uint64_t dropped = 0;
  node.server->store().DrainEvents(~size_t{0}, &events, &dropped);
  if (dropped != 0) {
    std::vector<Key128> keys;
    node.server->store().SnapshotKeys(&keys);
    node.keys = KeySet(keys.begin(), keys.end());
    removed.assign(kNumPreloads, true);
    return removed;
  }
  for (const BlockEvent& e : events) {
    if (e.added) {
      if (!node.keys.insert(e.key).second) {
        Fail("%s: key %s committed again without a removal (blocks are immutable)", node.name,
             e.key.Hex().c_str());
      }
    } else {
      if (node.keys.erase(e.key) == 0) {
        Fail("%s: removal of key %s, which was not committed", node.name, e.key.Hex().c_str());
      }
      for (size_t i = 0; i < kNumPreloads; ++i)
        removed[i] = removed[i] || KeyEq()(e.key, PreloadKey(i));
    }
  }
  return removed;
}

void CheckStore(const Node& node) {
  kvpool::BlockStore& store = node.server->store();
  const kvpool::BlockStoreStats s = store.Stats();
  if (s.reserved_blocks != 0 || s.reserved_bytes != 0) {
    Fail("%s: %llu reservations (%llu bytes) left behind", node.name,
         static_cast<unsigned long long>(s.reserved_blocks),
         static_cast<unsigned long long>(s.reserved_bytes));
  }
  if (s.pinned_blocks != 0 || s.pinned_bytes != 0) {
    Fail("%s: %llu pins (%llu bytes) left behind", node.name,
         static_cast<unsigned long long>(s.pinned_blocks),
         static_cast<unsigned long long>(s.pinned_bytes));
  }
  if (s.capacity_bytes != kPoolBytes || s.used_bytes > s.capacity_bytes ||
      s.used_bytes > s.high_watermark_bytes) {
    Fail("%s: used %llu bytes, high-water mark %llu, capacity %llu", node.name,
         static_cast<unsigned long long>(s.used_bytes),
         static_cast<unsigned long long>(s.high_watermark_bytes),
         static_cast<unsigned long long>(s.capacity_bytes));
  }
  // Without reservations or pins, used memory is exactly the committed blocks', each at least a
  // granule.
  if (s.entries != node.keys.size() || s.used_bytes < s.entries * kGranule) {
    Fail("%s: %llu entries in %llu bytes; the events say %zu keys", node.name,
         static_cast<unsigned long long>(s.entries), static_cast<unsigned long long>(s.used_bytes),
         node.keys.size());
  }
  std::vector<Key128> listed;
  store.SnapshotKeys(&listed);
  if (listed.size() != node.keys.size()) {
    Fail("%s: SnapshotKeys lists %zu keys, the events say %zu", node.name, listed.size(),
         node.keys.size());
  }
  for (const Key128& k : listed) {
    if (node.keys.count(k) == 0)
      Fail("%s: listed key %s never committed", node.name, k.Hex().c_str());
  }
  const std::vector<Key128> keys(node.keys.begin(), node.keys.end());
  auto present = std::make_unique<bool[]>(keys.size());
  store.Contains(keys, std::span<bool>(present.get(), keys.size()));
  for (size_t i = 0; i < keys.size(); ++i) {
    if (!present[i]) Fail("%s: committed key %s not found", node.name, keys[i].Hex().c_str());
  }
}

/// Puts preload `i` (absent now) back with its canonical bytes.
void Restore(Node& node, size_t i) {
  kvpool::BlockStore& store = node.server->store();
  const Key128 key = PreloadKey(i);
  const std::string& bytes = PreloadBytes(i);
  const uint64_t size = bytes.size();
  kvpool::PutResult result;
  kvpool::Reservation r;
  store.Reserve(std::span<const Key128>(&key, 1), std::span<const uint64_t>(&size, 1),
                std::span<kvpool::PutResult>(&result, 1), std::span<kvpool::Reservation>(&r, 1));
  if (result != kvpool::PutResult::kReserved) {
    Fail("%s: preload %zu cannot be put back (result %d)", node.name, i, static_cast<int>(result));
  }
  std::memcpy(r.data, bytes.data(), bytes.size());
  bool stored = false;
  store.Commit(std::span<const Key128>(&key, 1), std::span<const kvpool::Reservation>(&r, 1),
               std::span<bool>(&stored, 1));
  if (!stored) Fail("%s: preload %zu not stored", node.name, i);
}

/// Preload `i` is there with exactly its bytes.
void VerifyPreload(const Node& node, size_t i) {
  kvpool::BlockStore& store = node.server->store();
  const Key128 key = PreloadKey(i);
  kvpool::PinnedBlock pin;
  bool found = false;
  store.Pin(std::span<const Key128>(&key, 1), std::span<kvpool::PinnedBlock>(&pin, 1),
            std::span<bool>(&found, 1));
  if (!found) Fail("%s: preload %zu vanished without an eviction or DELETE", node.name, i);
  const std::string& bytes = PreloadBytes(i);
  const bool same = pin.size == bytes.size() && std::memcmp(pin.data, bytes.data(), pin.size) == 0;
  store.Unpin(std::span<const kvpool::PinnedBlock>(&pin, 1));
  if (!same) Fail("%s: preload %zu changed (%zu bytes now)", node.name, i, pin.size);
}

/// Checks the preloads that were not removed; puts the removed ones back.
void CheckPreloads(Node& node, std::vector<bool> removed) {
  for (size_t i = 0; i < kNumPreloads; ++i) {
    if (!removed[i]) VerifyPreload(node, i);
  }
  // Putting one back may evict another (the pool is full of the fuzzer's blocks): repeat.
  for (int round = 0; std::find(removed.begin(), removed.end(), true) != removed.end(); ++round) {
    if (round == 8) Fail("%s: the preloads cannot all be put back", node.name);
    kvpool::BlockStore& store = node.server->store();
    for (size_t i = 0; i < kNumPreloads; ++i) {
      if (!removed[i]) continue;
      // Whatever holds the key now (the fuzzer may have put its own bytes under it) goes first.
      const Key128 key = PreloadKey(i);
      bool deleted = false;
      store.Delete(std::span<const Key128>(&key, 1), std::span<bool>(&deleted, 1));
    }
    (void)DrainEvents(node);
    for (size_t i = 0; i < kNumPreloads; ++i) {
      if (removed[i]) Restore(node, i);
    }
    removed = DrainEvents(node);  // evictions the restores caused
    CheckStore(node);
  }
  for (size_t i = 0; i < kNumPreloads; ++i) VerifyPreload(node, i);
}

/// A fresh connection gets HELLO (+ AUTH) and STATS answered.
void Probe(const Node& node) {
  {
    Socket sock(node.server->port());
    if (node.auth) {
      Authenticate(sock, node);
    } else {
      sock.SendAll(Frame(Op::kHello, 0xF022'0003, HelloBody(1, node.version)));
      sock.ReadReply(Op::kHello, "the probe's HELLO");
    }
    sock.SendAll(Frame(Op::kStats, 0xF022'0004, ""));
    const std::string stats = sock.ReadReply(Op::kStats, "the probe's STATS");
    if (stats.empty() || stats.front() != '{' || stats.back() != '}') {
      Fail("%s: STATS reply is not a JSON object: %s", node.name, stats.c_str());
    }
  }
  WaitIdle(node);
}

// ---- Modes. ----------------------------------------------------------------------------------
enum class Prefix { kNone, kHelloV2, kHelloV1, kAuthenticated };
struct Mode {
  NodeIndex node;
  Prefix prefix;
  bool chunked = false;  // sent in pieces of 1 + (byte 0 >> 3) bytes (1..32)
};
// Byte 0 of the input, modulo 8. Raw bytes reach HELLO parsing; a valid HELLO in front reaches
// the other ops at once.
constexpr Mode kModes[8] = {
    {kOpen, Prefix::kNone},           // 0: raw, v2 node without auth
    {kOpen, Prefix::kHelloV2},        // 1: v2 HELLO, then the bytes
    {kOpen, Prefix::kHelloV1},        // 2: v1 HELLO, then the bytes
    {kAuth, Prefix::kNone},           // 3: raw, node with auth tokens
    {kAuth, Prefix::kAuthenticated},  // 4: HELLO + AUTH done by the harness, then the bytes
    {kV1, Prefix::kNone},             // 5: raw, node speaking only v1
    {kV1, Prefix::kHelloV1},          // 6: v1 HELLO to the v1 node, then the bytes
    {kOpen, Prefix::kHelloV2, true},  // 7: as 1, the bytes in small pieces
};

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  std::signal(SIGPIPE, SIG_IGN);
  kvpool::SetLogThreshold(100);  // silent: every input ends in a protocol error or an EOF
  g_nodes = new Node[kNumNodes];
  const char* names[kNumNodes] = {"open node", "auth node", "v1 node"};
  for (int i = 0; i < kNumNodes; ++i) {
    Node& node = g_nodes[i];
    const ServerOptions options = NodeOptions(static_cast<NodeIndex>(i));
    node.name = names[i];
    node.auth = !options.auth_tokens.empty();
    node.version = options.limits.version;
    node.limits = options.limits;
    auto server = Server::Start(options);
    if (!server.ok()) Fail("cannot start the %s: %s", names[i], server.status().ToString().c_str());
    node.server = std::move(server.value());
    for (size_t p = 0; p < kNumPreloads; ++p) Restore(node, p);
    (void)DrainEvents(node);
    CheckStore(node);
    CheckPreloads(node, std::vector<bool>(kNumPreloads, false));
    Probe(node);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const Mode mode = kModes[data[0] % 8];
  Node& node = g_nodes[mode.node];
  const std::string_view input(reinterpret_cast<const char*>(data) + 1, size - 1);
  {
    Socket sock(node.server->port());
    std::string out;
    if (mode.prefix == Prefix::kAuthenticated) {
      Authenticate(sock, node);
    } else if (mode.prefix != Prefix::kNone) {
      const uint32_t max = mode.prefix == Prefix::kHelloV1 ? 1 : 2;
      out = Frame(Op::kHello, 0xF022'0000, HelloBody(1, max));
    }
    out.append(input);
    const std::string in = sock.Exchange(out, mode.chunked ? 1 + (data[0] >> 3) : 0);
    CheckReplies(node, in, mode.prefix == Prefix::kAuthenticated);
  }
  WaitIdle(node);
  const std::vector<bool> removed = DrainEvents(node);
  CheckStore(node);
  CheckPreloads(node, removed);
  Probe(node);
  return 0;
}
