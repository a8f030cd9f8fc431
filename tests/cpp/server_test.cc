// A real Server on a free loopback port: Client round trips, and raw sockets sending every kind of
// malformed, truncated, oversized or stalled frame while a good client keeps working.
#include "kvpool/server.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kvpool/client.h"
#include "support/socket.h"

namespace kvpool {
namespace {

using protocol::Header;
using protocol::Op;
using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

constexpr size_t kMaxBlock = 256 << 10;
constexpr size_t kMaxFrame = 4 << 20;
constexpr uint32_t kMaxBatch = 64;

ServerOptions SmallServer(size_t capacity = 16 << 20, uint32_t io_timeout_ms = 5000) {
  ServerOptions o;
  o.host = "127.0.0.1";
  o.port = 0;
  o.store.capacity = capacity;
  o.store.hugepages = HugePages::kOff;
  o.store.high_watermark = 0.95;
  o.limits.max_batch_keys = kMaxBatch;
  o.limits.max_frame_bytes = kMaxFrame;
  o.limits.max_block_bytes = kMaxBlock;
  o.io_timeout_ms = io_timeout_ms;
  return o;
}

std::unique_ptr<Server> StartServer(const ServerOptions& options) {
  auto server = Server::Start(options);
  EXPECT_TRUE(server.ok()) << server.status().ToString();
  if (!server.ok()) return nullptr;
  EXPECT_NE(server.value()->port(), 0);
  return std::move(server.value());
}

std::unique_ptr<Client> ConnectClient(uint16_t port, uint32_t timeout_ms = 5000) {
  ClientOptions o;
  o.host = "127.0.0.1";
  o.port = port;
  o.timeout_ms = timeout_ms;
  auto client = Client::Connect(o);
  EXPECT_TRUE(client.ok()) << client.status().ToString();
  return client.ok() ? std::move(client.value()) : nullptr;
}

Key128 KeyOf(uint64_t i) { return Hash128(&i, sizeof i); }

std::vector<uint8_t> BlockOf(uint64_t id, size_t size) {
  std::vector<uint8_t> b(size);
  uint64_t x = id * 0x9E3779B97F4A7C15ull + 1;
  for (size_t i = 0; i < size; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    b[i] = static_cast<uint8_t>(x);
  }
  return b;
}

/// Stores blocks ids[i] (content BlockOf(id, size)); returns the put statuses.
std::vector<uint8_t> PutBlocks(Client& c, const std::vector<uint64_t>& ids, size_t size) {
  std::vector<Key128> keys;
  std::vector<std::vector<uint8_t>> data;
  std::vector<ConstBuffer> bufs;
  for (uint64_t id : ids) {
    keys.push_back(KeyOf(id));
    data.push_back(BlockOf(id, size));
  }
  for (const auto& d : data) bufs.push_back({d.data(), d.size()});
  std::vector<uint8_t> statuses(ids.size(), 0xff);
  const Status s = c.Put(keys, bufs, statuses);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return statuses;
}

/// Reads blocks ids and checks they are present with exactly their bytes.
::testing::AssertionResult BlocksIntact(Client& c, const std::vector<uint64_t>& ids, size_t size) {
  std::vector<Key128> keys;
  for (uint64_t id : ids) keys.push_back(KeyOf(id));
  std::vector<std::vector<uint8_t>> out(ids.size(), std::vector<uint8_t>(size));
  std::vector<MutableBuffer> bufs;
  for (auto& o : out) bufs.push_back({o.data(), o.size()});
  std::vector<uint8_t> found(ids.size(), 0);
  const Status s = c.GetInto(keys, bufs, found);
  if (!s.ok()) return ::testing::AssertionFailure() << "GET failed: " << s.ToString();
  for (size_t i = 0; i < ids.size(); ++i) {
    if (!found[i]) return ::testing::AssertionFailure() << "block " << ids[i] << " missing";
    if (out[i] != BlockOf(ids[i], size)) {
      return ::testing::AssertionFailure() << "block " << ids[i] << " has wrong bytes";
    }
  }
  return ::testing::AssertionSuccess();
}

// ---------------------------------------------------------------------------------------------
// Raw frames.

Header MakeHeader(Op op, uint32_t count, uint64_t body_bytes, uint64_t id = 1) {
  Header h;
  h.op = op;
  h.request_id = id;
  h.count = count;
  h.body_bytes = body_bytes;
  return h;
}

std::vector<uint8_t> Encode(const Header& h) {
  std::vector<uint8_t> raw(protocol::kHeaderBytes);
  protocol::EncodeHeader(h, raw.data());
  return raw;
}

void Append(std::vector<uint8_t>* out, const void* p, size_t n) {
  const auto* b = static_cast<const uint8_t*>(p);
  out->insert(out->end(), b, b + n);
}

class RawConn {
 public:
  explicit RawConn(uint16_t port) {
    auto fd = net::Connect("127.0.0.1", port, net::Deadline::In(milliseconds(2000)));
    EXPECT_TRUE(fd.ok()) << fd.status().ToString();
    if (fd.ok()) fd_ = std::move(fd.value());
  }

  Status Send(const std::vector<uint8_t>& bytes) {
    return net::SendAll(fd_.get(), bytes.data(), bytes.size(),
                        net::Deadline::In(milliseconds(5000)));
  }
  Status SendFrame(const Header& h, const std::vector<uint8_t>& body = {}) {
    std::vector<uint8_t> frame = Encode(h);
    frame.insert(frame.end(), body.begin(), body.end());
    return Send(frame);
  }

  /// Reads one reply: header and (up to 1 MiB of) body.
  Status ReadReply(Header* h, std::vector<uint8_t>* body,
                   milliseconds timeout = milliseconds(5000)) {
    const auto deadline = net::Deadline::In(timeout);
    uint8_t raw[protocol::kHeaderBytes];
    KVPOOL_RETURN_IF_ERROR(net::RecvAll(fd_.get(), raw, sizeof raw, deadline));
    *h = protocol::DecodeHeader(raw);
    if (h->body_bytes > (1 << 20)) return Status(ErrorCode::kProtocol, "reply body too large");
    body->resize(h->body_bytes);
    return net::RecvAll(fd_.get(), body->data(), body->size(), deadline);
  }

  void Hello(uint32_t min_version = 1, uint32_t max_version = 1) {
    std::vector<uint8_t> body;
    Append(&body, &min_version, 4);
    Append(&body, &max_version, 4);
    ASSERT_TRUE(SendFrame(MakeHeader(Op::kHello, 0, body.size(), 77), body).ok());
    Header h;
    std::vector<uint8_t> reply;
    const Status s = ReadReply(&h, &reply);
    ASSERT_TRUE(s.ok()) << s.ToString();
    ASSERT_EQ(h.flags, 0);
    ASSERT_EQ(h.request_id, 77u);
    // A v1 client (max_version 1) gets exactly the v1 reply: 24 bytes, version 1.
    if (max_version < 2) ASSERT_EQ(reply.size(), protocol::kHelloReplyBytes);
    ASSERT_GE(reply.size(), protocol::kHelloReplyBytes);
    const protocol::Limits limits = protocol::DecodeLimits(reply.data());
    EXPECT_EQ(limits.version, std::min(max_version, protocol::kVersion));
    EXPECT_EQ(limits.max_batch_keys, kMaxBatch);
    EXPECT_EQ(limits.max_frame_bytes, kMaxFrame);
    EXPECT_EQ(limits.max_block_bytes, kMaxBlock);
  }

  /// The node sent an error reply carrying `code` for request `id`, then closed the connection.
  ::testing::AssertionResult GotErrorThenClose(ErrorCode code, uint64_t id) {
    Header h;
    std::vector<uint8_t> body;
    const Status s = ReadReply(&h, &body);
    if (!s.ok()) return ::testing::AssertionFailure() << "no error reply: " << s.ToString();
    if (h.magic != protocol::kMagic)
      return ::testing::AssertionFailure() << "reply magic " << h.magic;
    if (!(h.flags & protocol::kFlagError))
      return ::testing::AssertionFailure() << "reply is not an error";
    if (h.status != static_cast<int32_t>(code)) {
      return ::testing::AssertionFailure()
             << "status " << h.status << " (" << std::string(body.begin(), body.end())
             << "), expected " << static_cast<int32_t>(code);
    }
    if (h.request_id != id) return ::testing::AssertionFailure() << "request id " << h.request_id;
    if (body.empty()) return ::testing::AssertionFailure() << "error reply without a message";
    if (!ClosedByPeer())
      return ::testing::AssertionFailure() << "connection not closed after the error";
    return ::testing::AssertionSuccess() << std::string(body.begin(), body.end());
  }

  /// EOF (or reset) arrives within a few seconds.
  bool ClosedByPeer(milliseconds timeout = milliseconds(5000)) {
    uint8_t b;
    const Status s = net::RecvAll(fd_.get(), &b, 1, net::Deadline::In(timeout));
    return s.code() == ErrorCode::kClosed || s.code() == ErrorCode::kConnection;
  }

  void Close() { fd_.Reset(); }
  int fd() const { return fd_.get(); }

 private:
  net::Fd fd_;
};

/// A PUT frame for blocks of the given ids/sizes; `truncate_to` cuts the frame short.
std::vector<uint8_t> PutFrame(const std::vector<uint64_t>& ids, const std::vector<size_t>& sizes,
                              uint64_t request_id = 5) {
  std::vector<uint8_t> table, payload;
  for (size_t i = 0; i < ids.size(); ++i) {
    const Key128 k = KeyOf(ids[i]);
    Append(&table, k.bytes.data(), 16);
    const uint64_t len = sizes[i];
    Append(&table, &len, 8);
    const auto b = BlockOf(ids[i], sizes[i]);
    payload.insert(payload.end(), b.begin(), b.end());
  }
  std::vector<uint8_t> frame = Encode(MakeHeader(Op::kPut, static_cast<uint32_t>(ids.size()),
                                                 table.size() + payload.size(), request_id));
  frame.insert(frame.end(), table.begin(), table.end());
  frame.insert(frame.end(), payload.begin(), payload.end());
  return frame;
}

/// Polls `pred` until it holds or `timeout` passes.
template <typename Pred>
bool Eventually(Pred pred, milliseconds timeout = milliseconds(5000)) {
  const auto until = Clock::now() + timeout;
  while (Clock::now() < until) {
    if (pred()) return true;
    std::this_thread::sleep_for(milliseconds(2));
  }
  return pred();
}

uint64_t JsonField(const std::string& json, const std::string& name) {
  const std::string tag = "\"" + name + "\":";
  const size_t at = json.find(tag);
  if (at == std::string::npos) return ~uint64_t{0};
  return std::stoull(json.substr(at + tag.size()));
}

// ---------------------------------------------------------------------------------------------

class ServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server_ = StartServer(SmallServer());
    ASSERT_NE(server_, nullptr);
    client_ = ConnectClient(server_->port());
    ASSERT_NE(client_, nullptr);
  }
  void TearDown() override {
    client_.reset();
    if (server_) server_->Stop();
  }
  uint16_t port() const { return server_->port(); }

  std::unique_ptr<Server> server_;
  std::unique_ptr<Client> client_;
};

TEST_F(ServerTest, RoundTripEveryOp) {
  const size_t size = 100000;
  std::vector<uint64_t> ids;
  for (uint64_t i = 0; i < 20; ++i) ids.push_back(i);
  auto st = PutBlocks(*client_, ids, size);
  for (uint8_t s : st) EXPECT_EQ(s, static_cast<uint8_t>(protocol::PutStatus::kStored));
  EXPECT_TRUE(BlocksIntact(*client_, ids, size));

  // Writing again is a no-op success.
  st = PutBlocks(*client_, {3, 4, 100}, size);
  EXPECT_EQ(st, (std::vector<uint8_t>{1, 1, 0}));

  std::vector<Key128> keys = {KeyOf(0), KeyOf(1), KeyOf(999), KeyOf(2)};
  std::vector<uint8_t> present(4);
  ASSERT_TRUE(client_->Exists(keys, present).ok());
  EXPECT_EQ(present, (std::vector<uint8_t>{1, 1, 0, 1}));
  auto matched = client_->MatchPrefix(keys);
  ASSERT_TRUE(matched.ok());
  EXPECT_EQ(matched.value(), 2u);

  // Get with a missing key and with a wrongly sized buffer.
  std::vector<uint8_t> a(size), b(size), c(size - 1);
  std::vector<MutableBuffer> bufs = {
      {a.data(), a.size()}, {b.data(), b.size()}, {c.data(), c.size()}};
  std::vector<Key128> get_keys = {KeyOf(5), KeyOf(12345), KeyOf(6)};
  std::vector<uint8_t> found(3);
  ASSERT_TRUE(client_->GetInto(get_keys, bufs, found).ok());
  EXPECT_EQ(found, (std::vector<uint8_t>{1, 0, 0}));
  EXPECT_EQ(a, BlockOf(5, size));

  std::vector<uint8_t> deleted(3);
  std::vector<Key128> del = {KeyOf(0), KeyOf(0), KeyOf(12345)};
  ASSERT_TRUE(client_->Delete(del, deleted).ok());
  EXPECT_EQ(deleted, (std::vector<uint8_t>{1, 0, 0}));
  matched = client_->MatchPrefix(keys);
  ASSERT_TRUE(matched.ok());
  EXPECT_EQ(matched.value(), 0u);

  auto stats = client_->StatsJson();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(JsonField(stats.value(), "entries"), 20u);  // 21 stored, 1 deleted
  EXPECT_EQ(JsonField(stats.value(), "stored"), 21u);
  EXPECT_EQ(JsonField(stats.value(), "deletes"), 1u);
  EXPECT_EQ(JsonField(stats.value(), "reserved_blocks"), 0u);
  EXPECT_EQ(JsonField(stats.value(), "capacity_bytes"), 16u << 20);
}

TEST_F(ServerTest, LargeBatchesAreSplitByTheClient) {
  // 3 x max_batch_keys keys and more than one frame's worth of bytes.
  const size_t size = 40000;
  std::vector<uint64_t> ids;
  for (uint64_t i = 0; i < 3 * kMaxBatch + 5; ++i) ids.push_back(1000 + i);
  auto st = PutBlocks(*client_, ids, size);
  for (uint8_t s : st) ASSERT_EQ(s, 0);
  EXPECT_TRUE(BlocksIntact(*client_, ids, size));
  std::vector<Key128> keys;
  for (uint64_t id : ids) keys.push_back(KeyOf(id));
  auto matched = client_->MatchPrefix(keys);
  ASSERT_TRUE(matched.ok());
  EXPECT_EQ(matched.value(), ids.size());
}

TEST_F(ServerTest, ClientRefusesBlockOverMaxBlockBytes) {
  std::vector<uint8_t> big(kMaxBlock + 1);
  const Key128 key = KeyOf(1);
  ConstBuffer buf{big.data(), big.size()};
  uint8_t status;
  const Status s =
      client_->Put(std::span<const Key128>(&key, 1), std::span<const ConstBuffer>(&buf, 1),
                   std::span<uint8_t>(&status, 1));
  EXPECT_EQ(s.code(), ErrorCode::kTooLarge);
}

TEST_F(ServerTest, PipelinedRequestsAreAnsweredInOrder) {
  PutBlocks(*client_, {1, 2}, 1000);
  RawConn raw(port());
  raw.Hello();
  std::vector<uint8_t> burst;
  for (uint64_t id = 10; id < 14; ++id) {
    const Key128 k = KeyOf(id % 2 == 0 ? 1 : 99);
    const auto h = Encode(MakeHeader(Op::kExists, 1, 16, id));
    burst.insert(burst.end(), h.begin(), h.end());
    Append(&burst, k.bytes.data(), 16);
  }
  const auto stats = Encode(MakeHeader(Op::kStats, 0, 0, 14));
  burst.insert(burst.end(), stats.begin(), stats.end());
  ASSERT_TRUE(raw.Send(burst).ok());
  for (uint64_t id = 10; id < 15; ++id) {
    Header h;
    std::vector<uint8_t> body;
    ASSERT_TRUE(raw.ReadReply(&h, &body).ok());
    EXPECT_EQ(h.request_id, id);
    EXPECT_EQ(h.flags, 0);
    if (id < 14) {
      EXPECT_EQ(h.op, Op::kExists);
      ASSERT_EQ(body.size(), 1u);
      EXPECT_EQ(body[0], id % 2 == 0 ? 1 : 0);
    } else {
      EXPECT_EQ(h.op, Op::kStats);
      EXPECT_EQ(body.front(), '{');
    }
  }
}

TEST_F(ServerTest, GetReplyWireFormat) {
  PutBlocks(*client_, {7}, 3000);
  RawConn raw(port());
  raw.Hello();
  std::vector<uint8_t> body;
  const Key128 a = KeyOf(8), b = KeyOf(7);
  Append(&body, a.bytes.data(), 16);
  Append(&body, b.bytes.data(), 16);
  ASSERT_TRUE(raw.SendFrame(MakeHeader(Op::kGet, 2, 32, 9), body).ok());
  Header h;
  std::vector<uint8_t> reply;
  ASSERT_TRUE(raw.ReadReply(&h, &reply).ok());
  EXPECT_EQ(h.op, Op::kGet);
  EXPECT_EQ(h.count, 2u);
  ASSERT_EQ(reply.size(), 16u + 3000u);
  uint64_t len[2];
  std::memcpy(len, reply.data(), 16);
  EXPECT_EQ(len[0], protocol::kMissing);
  EXPECT_EQ(len[1], 3000u);
  EXPECT_EQ(std::vector<uint8_t>(reply.begin() + 16, reply.end()), BlockOf(7, 3000));
}

// Every malformed frame: an error reply with the right code, then the connection is closed. A good
// client keeps working throughout and the stored blocks never change.
struct BadFrame {
  const char* name;
  bool hello_first;
  std::vector<uint8_t> frame;
  ErrorCode code;
  uint64_t id;
};

std::vector<BadFrame> BadFrames() {
  std::vector<BadFrame> cases;
  auto header_only = [&](const char* name, Header h, ErrorCode code, bool hello = true) {
    cases.push_back({name, hello, Encode(h), code, h.request_id});
  };
  Header h = MakeHeader(Op::kStats, 0, 0, 21);
  h.magic = 0x3150564C;
  header_only("bad magic", h, ErrorCode::kBadMagic);
  h.magic = 0;
  header_only("bad magic before hello", h, ErrorCode::kBadMagic, false);
  for (uint8_t op : {uint8_t{0}, uint8_t{9}, uint8_t{200}}) {
    Header u = MakeHeader(Op::kStats, 0, 0, 22);
    std::memcpy(&u.op, &op, 1);
    header_only("unknown op", u, ErrorCode::kUnknownOp);
  }
  Header f = MakeHeader(Op::kStats, 0, 0, 23);
  f.flags = 1;
  header_only("flags set", f, ErrorCode::kBadFrame);
  Header r = MakeHeader(Op::kGet, 0, 0, 24);
  r.reserved = 9;
  header_only("reserved set", r, ErrorCode::kBadFrame);
  Header s = MakeHeader(Op::kGet, 0, 0, 25);
  s.status = 400;
  header_only("status set", s, ErrorCode::kBadFrame);
  header_only("body too large", MakeHeader(Op::kPut, 1, kMaxFrame + 1, 26),
              ErrorCode::kFrameTooLarge);
  header_only("1 TiB body", MakeHeader(Op::kPut, 1, uint64_t{1} << 40, 27),
              ErrorCode::kFrameTooLarge);
  header_only("batch too large", MakeHeader(Op::kGet, kMaxBatch + 1, (kMaxBatch + 1) * 16, 28),
              ErrorCode::kBatchTooLarge);
  header_only("GET body not 16 x count", MakeHeader(Op::kGet, 2, 31, 29), ErrorCode::kBadFrame);
  header_only("DELETE body not 16 x count", MakeHeader(Op::kDelete, 1, 0, 30),
              ErrorCode::kBadFrame);
  header_only("STATS with a body", MakeHeader(Op::kStats, 0, 8, 31), ErrorCode::kBadFrame);
  header_only("PUT body shorter than its table", MakeHeader(Op::kPut, 2, 47, 32),
              ErrorCode::kBadFrame);
  header_only("HELLO body of 0", MakeHeader(Op::kHello, 0, 0, 33), ErrorCode::kBadFrame, false);
  header_only("first frame not HELLO", MakeHeader(Op::kStats, 0, 0, 34),
              ErrorCode::kHandshakeRequired, false);
  header_only("GET before HELLO", MakeHeader(Op::kGet, 0, 0, 35), ErrorCode::kHandshakeRequired,
              false);
  {
    // HELLO whose version range excludes 1 and 2.
    std::vector<uint8_t> frame = Encode(MakeHeader(Op::kHello, 0, 8, 36));
    const uint32_t v[2] = {3, 5};
    Append(&frame, v, 8);
    cases.push_back({"HELLO versions 3..5", false, frame, ErrorCode::kBadVersion, 36});
  }
  {
    // PUT whose table claims more payload than the body holds: the table of block 1 (id 0, which
    // the good client stored) says 10 bytes, the body carries none.
    std::vector<uint8_t> frame = Encode(MakeHeader(Op::kPut, 1, 24, 37));
    const Key128 k = KeyOf(0);
    const uint64_t len = 10;
    Append(&frame, k.bytes.data(), 16);
    Append(&frame, &len, 8);
    cases.push_back({"PUT table does not match body", true, frame, ErrorCode::kBadFrame, 37});
  }
  {
    // Lengths whose sum overflows 64 bits must not wrap into a plausible body size.
    std::vector<uint8_t> frame = Encode(MakeHeader(Op::kPut, 2, 48 + 16, 38));
    for (int i = 0; i < 2; ++i) {
      const Key128 k = KeyOf(500 + i);
      const uint64_t len = ~uint64_t{0} - 7;
      Append(&frame, k.bytes.data(), 16);
      Append(&frame, &len, 8);
    }
    frame.resize(frame.size() + 16, 0xab);
    cases.push_back({"PUT lengths overflow", true, frame, ErrorCode::kBadFrame, 38});
  }
  return cases;
}

TEST_F(ServerTest, MalformedFramesGetErrorReplyAndClose) {
  const size_t size = 50000;
  std::vector<uint64_t> stored_ids = {0, 1, 2, 3};
  PutBlocks(*client_, stored_ids, size);
  const uint64_t used_before = server_->store().Stats().used_bytes;

  // A second client hammers the node with good requests the whole time.
  std::atomic<bool> stop{false};
  std::atomic<int> good_rounds{0};
  std::atomic<bool> good_failed{false};
  std::thread good([&] {
    auto c = ConnectClient(port());
    if (!c) {
      good_failed = true;
      return;
    }
    for (uint64_t round = 0; !stop.load(); ++round) {
      const uint64_t id = 10000 + round % 50;
      PutBlocks(*c, {id}, 20000);
      if (!BlocksIntact(*c, {id}, 20000)) good_failed = true;
      if (!BlocksIntact(*c, stored_ids, size)) good_failed = true;
      ++good_rounds;
    }
  });

  for (const BadFrame& bad : BadFrames()) {
    SCOPED_TRACE(bad.name);
    const int rounds_before = good_rounds.load();
    RawConn raw(port());
    if (bad.hello_first) raw.Hello();
    ASSERT_TRUE(raw.Send(bad.frame).ok());
    EXPECT_TRUE(raw.GotErrorThenClose(bad.code, bad.id));
    // The good client made progress meanwhile and every stored block is unchanged.
    EXPECT_TRUE(Eventually([&] { return good_rounds.load() > rounds_before; }))
        << "good client stalled";
    EXPECT_TRUE(BlocksIntact(*client_, stored_ids, size));
  }
  stop = true;
  good.join();
  EXPECT_FALSE(good_failed.load());
  const BlockStoreStats s = server_->store().Stats();
  EXPECT_EQ(s.reserved_blocks, 0u);
  EXPECT_FALSE(server_->StatsJson().empty());
  EXPECT_GE(JsonField(server_->StatsJson(), "protocol_errors"), BadFrames().size());
  // Only the good client's blocks were added.
  EXPECT_GE(s.used_bytes, used_before);
  std::vector<Key128> probe = {KeyOf(500), KeyOf(501)};
  std::vector<uint8_t> present(2);
  ASSERT_TRUE(client_->Exists(probe, present).ok());
  EXPECT_EQ(present, (std::vector<uint8_t>{0, 0}));
}

TEST_F(ServerTest, GarbageBytesCloseTheConnection) {
  PutBlocks(*client_, {1, 2}, 4096);
  std::mt19937_64 rng(5);
  for (int round = 0; round < 20; ++round) {
    RawConn raw(port());
    if (round % 2 == 1) raw.Hello();
    std::vector<uint8_t> junk(protocol::kHeaderBytes + rng() % 4096);  // a whole header at least
    for (auto& b : junk) b = static_cast<uint8_t>(rng());
    if (!raw.Send(junk).ok()) continue;  // the node may already have closed on us
    // Either an error reply (BadMagic, ...) or a close; never a hang.
    Header h;
    std::vector<uint8_t> body;
    const Status s = raw.ReadReply(&h, &body);
    if (s.ok()) {
      EXPECT_TRUE(h.flags & protocol::kFlagError) << round;
      EXPECT_TRUE(raw.ClosedByPeer()) << round;
    } else {
      EXPECT_NE(s.code(), ErrorCode::kTimeout) << round << ": " << s.ToString();
    }
  }
  EXPECT_TRUE(BlocksIntact(*client_, {1, 2}, 4096));
}

TEST_F(ServerTest, OverwriteAttemptKeepsFirstBytes) {
  PutBlocks(*client_, {42}, 8192);
  RawConn raw(port());
  raw.Hello();
  // Same key, other bytes (those of block 43).
  std::vector<uint8_t> frame = Encode(MakeHeader(Op::kPut, 1, 24 + 8192, 3));
  const Key128 k = KeyOf(42);
  const uint64_t len = 8192;
  Append(&frame, k.bytes.data(), 16);
  Append(&frame, &len, 8);
  const auto other = BlockOf(43, 8192);
  frame.insert(frame.end(), other.begin(), other.end());
  ASSERT_TRUE(raw.Send(frame).ok());
  Header h;
  std::vector<uint8_t> body;
  ASSERT_TRUE(raw.ReadReply(&h, &body).ok());
  EXPECT_EQ(h.flags, 0);
  EXPECT_EQ(body, (std::vector<uint8_t>{static_cast<uint8_t>(protocol::PutStatus::kExists)}));
  EXPECT_TRUE(BlocksIntact(*client_, {42}, 8192));
}

TEST_F(ServerTest, OversizedBlockIsRefusedPerBlockAndConnectionStaysOpen) {
  RawConn raw(port());
  raw.Hello();
  ASSERT_TRUE(raw.Send(PutFrame({1, 2, 3}, {1000, kMaxBlock + 1, 2000}, 8)).ok());
  Header h;
  std::vector<uint8_t> body;
  ASSERT_TRUE(raw.ReadReply(&h, &body).ok());
  EXPECT_EQ(h.flags, 0);
  EXPECT_EQ(h.request_id, 8u);
  EXPECT_EQ(body,
            (std::vector<uint8_t>{0, static_cast<uint8_t>(protocol::PutStatus::kTooLarge), 0}));
  // The refused payload was consumed: the next frame on the connection parses.
  ASSERT_TRUE(raw.SendFrame(MakeHeader(Op::kStats, 0, 0, 9)).ok());
  ASSERT_TRUE(raw.ReadReply(&h, &body).ok());
  EXPECT_EQ(h.request_id, 9u);
  EXPECT_EQ(h.flags, 0);
  EXPECT_TRUE(BlocksIntact(*client_, {1}, 1000));
  EXPECT_TRUE(BlocksIntact(*client_, {3}, 2000));
  std::vector<uint8_t> present(1);
  const Key128 k2 = KeyOf(2);
  ASSERT_TRUE(client_->Exists(std::span<const Key128>(&k2, 1), present).ok());
  EXPECT_EQ(present[0], 0);
}

TEST_F(ServerTest, TruncatedPutThenCloseLeavesNothingBehind) {
  PutBlocks(*client_, {1}, 4096);
  const BlockStoreStats before = server_->store().Stats();
  ASSERT_EQ(before.reserved_blocks, 0u);
  const size_t size = 200000;
  std::vector<uint8_t> frame = PutFrame({100, 101, 102}, {size, size, size});
  // The table, the first block and half of the second.
  frame.resize(protocol::kHeaderBytes + 3 * 24 + size + size / 2);
  RawConn raw(port());
  raw.Hello();
  ASSERT_TRUE(raw.Send(frame).ok());
  // The node reserves room for all three blocks once the table is in ...
  ASSERT_TRUE(Eventually([&] { return server_->store().Stats().reserved_blocks == 3; }));
  EXPECT_GT(server_->store().Stats().used_bytes, before.used_bytes);
  std::vector<Key128> keys = {KeyOf(100), KeyOf(101), KeyOf(102)};
  std::vector<uint8_t> present(3);
  ASSERT_TRUE(client_->Exists(keys, present).ok());
  EXPECT_EQ(present, (std::vector<uint8_t>{0, 0, 0}));  // not even the complete first block
  // ... and frees all of it when the writer goes away.
  raw.Close();
  EXPECT_TRUE(Eventually([&] {
    const BlockStoreStats s = server_->store().Stats();
    return s.reserved_blocks == 0 && s.used_bytes == before.used_bytes;
  })) << "reserved "
      << server_->store().Stats().reserved_blocks << " used " << server_->store().Stats().used_bytes
      << " (was " << before.used_bytes << ")";
  ASSERT_TRUE(client_->Exists(keys, present).ok());
  EXPECT_EQ(present, (std::vector<uint8_t>{0, 0, 0}));
  EXPECT_EQ(server_->store().Stats().entries, before.entries);
  // The keys can be written normally afterwards.
  auto st = PutBlocks(*client_, {100, 101, 102}, size);
  EXPECT_EQ(st, (std::vector<uint8_t>{0, 0, 0}));
  EXPECT_TRUE(BlocksIntact(*client_, {100, 101, 102}, size));
}

TEST(ServerTimeout, StalledWriterIsDisconnected) {
  auto server = StartServer(SmallServer(16 << 20, /*io_timeout_ms=*/200));
  ASSERT_NE(server, nullptr);
  const size_t size = 100000;
  std::vector<uint8_t> frame = PutFrame({1, 2}, {size, size});
  frame.resize(frame.size() - size / 2);  // stall in the middle of the second payload
  RawConn raw(server->port());
  raw.Hello();
  const auto start = Clock::now();
  ASSERT_TRUE(raw.Send(frame).ok());
  EXPECT_TRUE(raw.ClosedByPeer(milliseconds(5000)));
  const auto waited = std::chrono::duration_cast<milliseconds>(Clock::now() - start).count();
  EXPECT_GE(waited, 150);
  EXPECT_LT(waited, 3000);
  EXPECT_TRUE(Eventually([&] { return server->store().Stats().reserved_blocks == 0; }));
  EXPECT_EQ(server->store().Stats().used_bytes, 0u);
  EXPECT_EQ(server->store().Stats().entries, 0u);
  server->Stop();
}

TEST(ServerTimeout, StalledHeaderIsDisconnected) {
  auto server = StartServer(SmallServer(16 << 20, /*io_timeout_ms=*/200));
  ASSERT_NE(server, nullptr);
  RawConn raw(server->port());
  raw.Hello();
  std::vector<uint8_t> part = Encode(MakeHeader(Op::kStats, 0, 0, 2));
  part.resize(10);
  ASSERT_TRUE(raw.Send(part).ok());
  EXPECT_TRUE(raw.ClosedByPeer(milliseconds(5000)));
  server->Stop();
}

TEST(ServerTimeout, IdleConnectionBetweenFramesStaysOpen) {
  auto server = StartServer(SmallServer(16 << 20, /*io_timeout_ms=*/100));
  ASSERT_NE(server, nullptr);
  auto client = ConnectClient(server->port());
  ASSERT_NE(client, nullptr);
  PutBlocks(*client, {1}, 1000);
  RawConn raw(server->port());
  raw.Hello();
  // Idle for several io_timeouts: the clock only runs inside a frame.
  std::this_thread::sleep_for(milliseconds(500));
  ASSERT_TRUE(raw.SendFrame(MakeHeader(Op::kStats, 0, 0, 3)).ok());
  Header h;
  std::vector<uint8_t> body;
  ASSERT_TRUE(raw.ReadReply(&h, &body).ok());
  EXPECT_EQ(h.flags, 0);
  EXPECT_TRUE(BlocksIntact(*client, {1}, 1000));  // the client's pooled connection idled too
  server->Stop();
}

TEST(ServerStop, ReturnsPromptlyWithConnectedClients) {
  auto server = StartServer(SmallServer());
  ASSERT_NE(server, nullptr);
  auto client = ConnectClient(server->port());
  ASSERT_NE(client, nullptr);
  PutBlocks(*client, {1}, 1000);
  std::vector<std::unique_ptr<RawConn>> idle;
  for (int i = 0; i < 8; ++i) {
    idle.push_back(std::make_unique<RawConn>(server->port()));
    if (i % 2 == 0) idle.back()->Hello();
  }
  // One writer stalled in the middle of a PUT, one in the middle of a header.
  RawConn writer(server->port());
  writer.Hello();
  std::vector<uint8_t> frame = PutFrame({7}, {100000});
  frame.resize(frame.size() / 2);
  ASSERT_TRUE(writer.Send(frame).ok());
  RawConn half(server->port());
  half.Hello();
  ASSERT_TRUE(half.Send(std::vector<uint8_t>(5, 'K')).ok());
  ASSERT_TRUE(Eventually([&] { return server->store().Stats().reserved_blocks == 1; }));

  const auto start = Clock::now();
  server->Stop();
  const auto took = std::chrono::duration_cast<milliseconds>(Clock::now() - start).count();
  EXPECT_LT(took, 2000);
  EXPECT_EQ(server->store().Stats().reserved_blocks, 0u);
  for (auto& c : idle) EXPECT_TRUE(c->ClosedByPeer(milliseconds(2000)));
  EXPECT_TRUE(writer.ClosedByPeer(milliseconds(2000)));
  server->Stop();  // idempotent
  // Calls fail cleanly (no hang) once the node is gone.
  std::vector<uint8_t> present(1);
  const Key128 k = KeyOf(1);
  const Status s = client->Exists(std::span<const Key128>(&k, 1), present);
  EXPECT_FALSE(s.ok());
}

TEST(ServerLargeBatch, SplitOverTwoConnectionsKeepsEveryIndex) {
  ServerOptions options = SmallServer(64 << 20);
  options.limits.max_block_bytes = 1 << 20;
  options.limits.max_frame_bytes = 8 << 20;  // also forces several frames per half
  auto server = StartServer(options);
  ASSERT_NE(server, nullptr);
  auto client = ConnectClient(server->port());
  ASSERT_NE(client, nullptr);
  // 40 x 512 KiB = 20 MiB: above the client's threshold for moving a batch in two halves.
  constexpr size_t kSize = 512 << 10;
  std::vector<uint64_t> ids;
  for (uint64_t i = 0; i < 40; ++i) ids.push_back(5000 + i);
  for (uint8_t st : PutBlocks(*client, ids, kSize)) EXPECT_EQ(st, 0);
  // Read back with a missing key and a wrong-sized buffer in the second half.
  std::vector<Key128> keys;
  for (uint64_t id : ids) keys.push_back(KeyOf(id));
  keys[30] = KeyOf(999999999);
  std::vector<std::vector<uint8_t>> out(keys.size(), std::vector<uint8_t>(kSize));
  out[35].resize(kSize - 1);
  std::vector<MutableBuffer> bufs;
  for (auto& o : out) bufs.push_back({o.data(), o.size()});
  std::vector<uint8_t> found(keys.size(), 9);
  ASSERT_TRUE(client->GetInto(keys, bufs, found).ok());
  for (size_t i = 0; i < keys.size(); ++i) {
    if (i == 30 || i == 35) {
      EXPECT_EQ(found[i], 0) << i;
      continue;
    }
    ASSERT_EQ(found[i], 1) << i;
    EXPECT_EQ(out[i], BlockOf(ids[i], kSize)) << i;
  }
}

TEST(ServerConcurrency, ManyClientsPutAndGet) {
  auto server = StartServer(SmallServer(64 << 20));
  ASSERT_NE(server, nullptr);
  constexpr int kThreads = 32;
  constexpr int kBlocksPerThread = 40;
  constexpr size_t kSize = 16384 + 123;
  auto shared = ConnectClient(server->port());
  ASSERT_NE(shared, nullptr);
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      // Half the threads own a client, half share one (it is thread-safe).
      std::unique_ptr<Client> own = t % 2 == 0 ? ConnectClient(server->port()) : nullptr;
      Client* c = t % 2 == 0 ? own.get() : shared.get();
      if (c == nullptr) {
        ++failures;
        return;
      }
      for (int round = 0; round < kBlocksPerThread / 4; ++round) {
        std::vector<uint64_t> ids;
        for (int i = 0; i < 4; ++i) ids.push_back(uint64_t(t) * 1000 + round * 4 + i);
        // Every thread also writes one key that all threads share.
        ids.push_back(999999);
        const auto st = PutBlocks(*c, ids, kSize);
        for (uint8_t s : st) {
          if (s > 1) {
            ++failures;
            ADD_FAILURE() << "put status " << int(s);
          }
        }
        const auto intact = BlocksIntact(*c, ids, kSize);
        if (!intact) {
          ++failures;
          ADD_FAILURE() << intact.message();
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  const BlockStoreStats s = server->store().Stats();
  EXPECT_EQ(s.entries, uint64_t{kThreads} * kBlocksPerThread + 1);
  EXPECT_EQ(s.reserved_blocks, 0u);
  EXPECT_EQ(s.evictions, 0u);
  // A node unpins after its last byte is on the wire, which can be just after the client has it.
  EXPECT_TRUE(Eventually([&] { return server->store().Stats().pinned_blocks == 0; }));
  server->Stop();
}

TEST(ServerStart, BadOptions) {
  ServerOptions o = SmallServer();
  o.limits.max_batch_keys = 0;
  EXPECT_EQ(Server::Start(o).status().code(), ErrorCode::kInvalidArgument);
  o = SmallServer();
  o.store.high_watermark = 2.0;
  EXPECT_EQ(Server::Start(o).status().code(), ErrorCode::kInvalidArgument);
  // A port in use.
  auto first = StartServer(SmallServer());
  ASSERT_NE(first, nullptr);
  o = SmallServer();
  o.port = first->port();
  EXPECT_EQ(Server::Start(o).status().code(), ErrorCode::kConnection);
}

}  // namespace
}  // namespace kvpool
