// Payload links on a socketpair: ShmLink (the client's StagingArena mapped by the node, payloads
// copied between it and node memory) and TcpLink (inline only), checked through the Link API the
// server drives: Open, CheckRuns, Pull (PUT) and Push (GET).
#include "transport/shm/shm_link.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kvpool/staging.h"
#include "kvpool/transport.h"
#include "support/socket.h"
#include "transport/tcp/tcp_link.h"

namespace kvpool {
namespace {

using std::chrono::milliseconds;

constexpr uint64_t kInline = protocol::kInline;
constexpr size_t kArenaBytes = 4 << 20;

net::Deadline Soon() { return net::Deadline::In(milliseconds(2000)); }

bool Contains(const Status& s, const std::string& part) {
  return s.message().find(part) != std::string::npos;
}

std::vector<uint8_t> Pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(seed + i * 13);
  return v;
}

/// A memfd of `bytes` with `seals` added (0: none); -1 on failure.
int MakeMemfd(size_t bytes, unsigned flags, int seals) {
  const int fd = memfd_create("kvpool-test", MFD_CLOEXEC | flags);
  if (fd < 0) return -1;
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0 ||
      (seals != 0 && fcntl(fd, F_ADD_SEALS, seals) != 0)) {
    ::close(fd);
    return -1;
  }
  return fd;
}

/// The control stream: `node` is the node's end (non-blocking, as the server makes it),
/// `client` the client's (blocking).
struct StreamPair {
  StreamPair() {
    int sv[2];
    EXPECT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0) << std::strerror(errno);
    node = net::Fd(sv[0]);
    client = net::Fd(sv[1]);
    EXPECT_EQ(fcntl(node.get(), F_SETFL, fcntl(node.get(), F_GETFL) | O_NONBLOCK), 0);
  }
  net::Fd node, client;
};

/// Reads exactly n bytes from fd.
std::vector<uint8_t> ReadExactly(int fd, size_t n) {
  std::vector<uint8_t> v(n);
  const Status s = net::RecvAll(fd, v.data(), n, Soon());
  EXPECT_TRUE(s.ok()) << s.ToString();
  return v;
}

/// Nothing more is waiting on fd right now.
bool NothingPending(int fd) {
  uint8_t b;
  const ssize_t n = recv(fd, &b, 1, MSG_DONTWAIT);
  return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
}

void Send(int fd, const std::vector<uint8_t>& bytes) {
  const Status s = net::SendAll(fd, bytes.data(), bytes.size(), Soon());
  ASSERT_TRUE(s.ok()) << s.ToString();
}

class ShmLinkTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto arena = StagingArena::Create(kArenaBytes);
    ASSERT_TRUE(arena.ok()) << arena.status().ToString();
    arena_ = arena.value();
    auto link = ShmLink::Open(pair_.node.get(), arena_->fd(), arena_->size());
    ASSERT_TRUE(link.ok()) << link.status().ToString();
    link_ = std::move(link.value());
  }

  /// A run of the arena holding `bytes` (client side), described as the node addresses it.
  PeerBuffer Stage(const std::vector<uint8_t>& bytes) {
    const MutableBuffer b = arena_->Take(bytes.size());
    EXPECT_NE(b.data, nullptr);
    std::memcpy(b.data, bytes.data(), bytes.size());
    return {*arena_->Offset(b.data, b.size), bytes.size()};
  }
  uint8_t* At(const PeerBuffer& p) { return arena_->base() + p.addr; }

  StreamPair pair_;
  std::shared_ptr<StagingArena> arena_;
  std::unique_ptr<ShmLink> link_;
};

// ---------------------------------------------------------------------------------------------
// Open.

TEST(ShmLinkOpen, MapsASealedMemfdOfAtLeastTheClaimedSize) {
  StreamPair pair;
  const auto arena = StagingArena::Create(1);
  ASSERT_TRUE(arena.ok());
  auto link = ShmLink::Open(pair.node.get(), arena.value()->fd(), arena.value()->size());
  ASSERT_TRUE(link.ok()) << link.status().ToString();
  EXPECT_EQ(link.value()->kind(), TransportKind::kShm);
  EXPECT_EQ(link.value()->arena_bytes(), arena.value()->size());
  // "at least `bytes`": a larger file is fine; the link addresses only the claimed bytes.
  auto smaller = ShmLink::Open(pair.node.get(), arena.value()->fd(), 4096);
  ASSERT_TRUE(smaller.ok()) << smaller.status().ToString();
  EXPECT_EQ(smaller.value()->arena_bytes(), 4096u);
  const PeerBuffer past[] = {{4096, 1}};
  EXPECT_EQ(smaller.value()->CheckRuns(past).code(), ErrorCode::kBadFrame);
}

TEST(ShmLinkOpen, ZeroBytesIsRefused) {
  StreamPair pair;
  const auto arena = StagingArena::Create(1);
  ASSERT_TRUE(arena.ok());
  const auto link = ShmLink::Open(pair.node.get(), arena.value()->fd(), 0);
  ASSERT_FALSE(link.ok());
  EXPECT_EQ(link.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_TRUE(Contains(link.status(), "0 bytes")) << link.status().ToString();
}

TEST(ShmLinkOpen, MemfdWithoutSealingIsRefused) {
  // memfd_create without MFD_ALLOW_SEALING: the file can shrink under the node's mapping.
  StreamPair pair;
  const int fd = MakeMemfd(kArenaBytes, 0, 0);
  ASSERT_GE(fd, 0) << std::strerror(errno);
  const auto link = ShmLink::Open(pair.node.get(), fd, kArenaBytes);
  ::close(fd);
  ASSERT_FALSE(link.ok());
  EXPECT_EQ(link.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_TRUE(Contains(link.status(), "F_SEAL_SHRINK")) << link.status().ToString();
}

TEST(ShmLinkOpen, SealableMemfdWithoutTheShrinkSealIsRefused) {
  // Sealing allowed, but only GROW sealed: still shrinkable, still refused.
  StreamPair pair;
  for (int seals : {0, F_SEAL_GROW, F_SEAL_GROW | F_SEAL_SEAL}) {
    const int fd = MakeMemfd(kArenaBytes, MFD_ALLOW_SEALING, seals);
    ASSERT_GE(fd, 0) << std::strerror(errno);
    const auto link = ShmLink::Open(pair.node.get(), fd, kArenaBytes);
    ::close(fd);
    ASSERT_FALSE(link.ok()) << "seals " << seals;
    EXPECT_EQ(link.status().code(), ErrorCode::kInvalidArgument);
    EXPECT_TRUE(Contains(link.status(), "F_SEAL_SHRINK")) << link.status().ToString();
  }
}

TEST(ShmLinkOpen, RegularFileIsRefused) {
  StreamPair pair;
  char path[] = "/tmp/kvpool-shm-link-XXXXXX";
  const int fd = mkstemp(path);
  ASSERT_GE(fd, 0) << std::strerror(errno);
  unlink(path);
  ASSERT_EQ(ftruncate(fd, kArenaBytes), 0);
  const auto link = ShmLink::Open(pair.node.get(), fd, kArenaBytes);
  ::close(fd);
  ASSERT_FALSE(link.ok());
  EXPECT_EQ(link.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_TRUE(Contains(link.status(), "memfd")) << link.status().ToString();
}

TEST(ShmLinkOpen, SocketIsRefused) {
  // Not a file at all: the node's own stream socket passed back as the arena.
  StreamPair pair;
  const auto link = ShmLink::Open(pair.node.get(), pair.client.get(), kArenaBytes);
  ASSERT_FALSE(link.ok());
  EXPECT_EQ(link.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_FALSE(link.status().message().empty());
}

TEST(ShmLinkOpen, MemfdSmallerThanClaimedIsRefused) {
  StreamPair pair;
  const int fd = MakeMemfd(64 << 10, MFD_ALLOW_SEALING, F_SEAL_SHRINK | F_SEAL_GROW);
  ASSERT_GE(fd, 0) << std::strerror(errno);
  const auto link = ShmLink::Open(pair.node.get(), fd, (64 << 10) + 1);
  ::close(fd);
  ASSERT_FALSE(link.ok());
  EXPECT_EQ(link.status().code(), ErrorCode::kInvalidArgument);
  // The message names both sizes.
  EXPECT_TRUE(Contains(link.status(), std::to_string(64 << 10))) << link.status().ToString();
  EXPECT_TRUE(Contains(link.status(), std::to_string((64 << 10) + 1))) << link.status().ToString();
}

TEST(ShmLinkOpen, HugetlbfsMemfdIsRefused) {
  // A hugetlbfs page that cannot be allocated on first touch faults instead of failing.
  StreamPair pair;
  const int fd = memfd_create("kvpool-test-huge", MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_HUGETLB);
  if (fd < 0) GTEST_SKIP() << "no hugetlbfs memfd here: " << std::strerror(errno);
  if (ftruncate(fd, 2 << 20) != 0 || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) != 0) {
    ::close(fd);
    GTEST_SKIP() << "cannot size or seal a hugetlbfs memfd here: " << std::strerror(errno);
  }
  const auto link = ShmLink::Open(pair.node.get(), fd, 2 << 20);
  ::close(fd);
  ASSERT_FALSE(link.ok());
  EXPECT_EQ(link.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_TRUE(Contains(link.status(), "hugetlbfs")) << link.status().ToString();
}

TEST(ShmLinkOpen, WriteSealedMemfdIsRefused) {
  // The node writes GET blocks into the arena, so it must be able to map it writable.
  StreamPair pair;
  const int fd = MakeMemfd(kArenaBytes, MFD_ALLOW_SEALING, F_SEAL_SHRINK | F_SEAL_WRITE);
  ASSERT_GE(fd, 0) << std::strerror(errno);
  const auto link = ShmLink::Open(pair.node.get(), fd, kArenaBytes);
  ::close(fd);
  ASSERT_FALSE(link.ok());
  EXPECT_EQ(link.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_TRUE(Contains(link.status(), "map")) << link.status().ToString();
}

TEST(ShmLinkOpen, TheMappingOutlivesTheCallersDescriptor) {
  // "Takes ownership of nothing: the caller closes `memfd`": the link keeps its own mapping, so
  // closing the descriptor right after Open (as the server does) leaves the arena reachable.
  StreamPair pair;
  const int fd = MakeMemfd(kArenaBytes, MFD_ALLOW_SEALING, F_SEAL_SHRINK | F_SEAL_GROW);
  ASSERT_GE(fd, 0);
  void* client = mmap(nullptr, kArenaBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ASSERT_NE(client, MAP_FAILED);
  auto link = ShmLink::Open(pair.node.get(), fd, kArenaBytes);
  ::close(fd);
  ASSERT_TRUE(link.ok()) << link.status().ToString();
  const std::vector<uint8_t> bytes = Pattern(300, 9);
  std::memcpy(static_cast<uint8_t*>(client) + 8192, bytes.data(), bytes.size());
  const PeerBuffer from[] = {{8192, bytes.size()}};
  std::vector<uint8_t> got(bytes.size());
  const MutableBuffer into[] = {{got.data(), got.size()}};
  ASSERT_TRUE(link.value()->CheckRuns(from).ok());
  const Status s = link.value()->Pull(from, into, Soon());
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(got, bytes);
  munmap(client, kArenaBytes);
}

// ---------------------------------------------------------------------------------------------
// CheckRuns.

TEST_F(ShmLinkTest, RunsInsideTheArenaAreAccepted) {
  const uint64_t n = link_->arena_bytes();
  const PeerBuffer runs[] = {{0, 4096}, {8192, 100}, {n - 1, 1}};
  EXPECT_TRUE(link_->CheckRuns(runs).ok());
  const PeerBuffer whole[] = {{0, n}};
  EXPECT_TRUE(link_->CheckRuns(whole).ok());
  EXPECT_TRUE(link_->CheckRuns({}).ok());
}

TEST_F(ShmLinkTest, RunsOutOfBoundsAreBadFrameNamingTheEntry) {
  const uint64_t n = link_->arena_bytes();
  const PeerBuffer cases[][2] = {
      {{0, 16}, {n - 10, 11}},   // runs one byte past the end
      {{0, 16}, {n, 1}},         // starts at the end
      {{0, 16}, {n + 4096, 4}},  // starts beyond it
      {{0, 16}, {0, n + 1}},     // longer than the arena
      {{0, 16}, {n + 1, 0}},     // empty, but beyond the end
  };
  for (const auto& runs : cases) {
    const Status s = link_->CheckRuns(runs);
    EXPECT_EQ(s.code(), ErrorCode::kBadFrame) << runs[1].addr << " +" << runs[1].size;
    EXPECT_TRUE(Contains(s, "entry 1")) << s.ToString();
  }
}

TEST_F(ShmLinkTest, RunsWhoseEndWrapsAroundAreBadFrame) {
  // addr + size overflowing 64 bits must not wrap into the arena.
  const uint64_t max = UINT64_MAX;
  const PeerBuffer cases[][1] = {
      {{max - 1, 16}},       // addr near the top (UINT64_MAX itself means inline)
      {{max - 15, 16}},      // ends exactly at 2^64 (wraps to 0)
      {{16, max - 8}},       // addr + size wraps to 7
      {{4096, max - 4095}},  // wraps to 0
      {{max - 1, 0}},        // empty, far out of bounds
  };
  for (const auto& runs : cases) {
    const Status s = link_->CheckRuns(runs);
    EXPECT_EQ(s.code(), ErrorCode::kBadFrame) << runs[0].addr << " +" << runs[0].size;
  }
}

TEST_F(ShmLinkTest, OverlappingRunsAreBadFrameInAnyOrder) {
  const PeerBuffer cases[][3] = {
      {{0, 4096}, {4095, 10}, {20000, 1}},    // last byte shared with the next run
      {{8192, 100}, {0, 4096}, {100, 50}},    // out of table order
      {{0, 8192}, {100000, 5}, {4096, 10}},   // one inside another
      {{500, 10}, {20000, 1}, {500, 10}},     // the same run twice
      {{1000, 10}, {995, 10}, {60000, 1}},    // starts just before another
      {{0, 65536}, {100, 10}, {40000, 100}},  // one run covering two others
  };
  for (const auto& runs : cases) {
    const Status s = link_->CheckRuns(runs);
    EXPECT_EQ(s.code(), ErrorCode::kBadFrame)
        << runs[0].addr << "," << runs[1].addr << "," << runs[2].addr;
    EXPECT_TRUE(Contains(s, "overlap")) << s.ToString();
  }
}

TEST_F(ShmLinkTest, AdjacentRunsAreAccepted) {
  const PeerBuffer forward[] = {{0, 4096}, {4096, 4096}, {8192, 1}, {8193, 7}};
  EXPECT_TRUE(link_->CheckRuns(forward).ok());
  const PeerBuffer backward[] = {{8193, 7}, {8192, 1}, {4096, 4096}, {0, 4096}};
  EXPECT_TRUE(link_->CheckRuns(backward).ok());
}

TEST_F(ShmLinkTest, InlineEntriesAreIgnored) {
  // An inline entry names no arena bytes, however large its size.
  const PeerBuffer runs[] = {
      {kInline, UINT64_MAX}, {0, 4096}, {kInline, 4096}, {kInline, 0}, {4096, 10}};
  EXPECT_TRUE(link_->CheckRuns(runs).ok());
  const PeerBuffer only_inline[] = {{kInline, 100}, {kInline, UINT64_MAX}};
  EXPECT_TRUE(link_->CheckRuns(only_inline).ok());
}

TEST_F(ShmLinkTest, ZeroSizeRunsNeverOverlapButMustBeInBounds) {
  const uint64_t n = link_->arena_bytes();
  // Empty runs inside another run, at the same address as each other, at the very end.
  const PeerBuffer runs[] = {{0, 4096}, {100, 0}, {100, 0}, {0, 0}, {4096, 0}, {n, 0}};
  EXPECT_TRUE(link_->CheckRuns(runs).ok());
  const PeerBuffer beyond[] = {{0, 4096}, {n + 1, 0}};
  EXPECT_EQ(link_->CheckRuns(beyond).code(), ErrorCode::kBadFrame);
}

TEST_F(ShmLinkTest, CheckRunsKeepsNoStateBetweenFrames) {
  // The sort scratch is reused across frames: a frame is judged on its own runs only.
  const PeerBuffer first[] = {{0, 4096}, {4096, 4096}};
  ASSERT_TRUE(link_->CheckRuns(first).ok());
  const PeerBuffer second[] = {{100, 10}};  // would overlap the first frame's runs
  EXPECT_TRUE(link_->CheckRuns(second).ok());
  const PeerBuffer bad[] = {{0, 10}, {5, 10}};
  ASSERT_EQ(link_->CheckRuns(bad).code(), ErrorCode::kBadFrame);
  EXPECT_TRUE(link_->CheckRuns(second).ok());
}

TEST(CheckRunsInRegion, JudgesAgainstTheGivenRegion) {
  std::vector<PeerBuffer> scratch;
  const PeerBuffer runs[] = {{0, 10}, {10, 90}};
  EXPECT_TRUE(CheckRunsInRegion(runs, 100, scratch).ok());
  EXPECT_EQ(CheckRunsInRegion(runs, 99, scratch).code(), ErrorCode::kBadFrame);
  const PeerBuffer empty_region[] = {{0, 0}};
  EXPECT_TRUE(CheckRunsInRegion(empty_region, 0, scratch).ok());
  const PeerBuffer one[] = {{0, 1}};
  EXPECT_EQ(CheckRunsInRegion(one, 0, scratch).code(), ErrorCode::kBadFrame);
}

// ---------------------------------------------------------------------------------------------
// Pull (PUT).

TEST_F(ShmLinkTest, PullFillsDescribedAndInlineEntriesAndConsumesOnlyTheInlineBytes) {
  // Table: described, inline, described but refused, inline but refused, empty described,
  // inline. Each into buffer sits between guard bytes that must stay untouched.
  const auto d0 = Pattern(5000, 1), i1 = Pattern(777, 2), d2 = Pattern(3000, 3);
  const auto i3 = Pattern(1234, 4), i5 = Pattern(65, 5);
  const PeerBuffer p0 = Stage(d0), p2 = Stage(d2);
  const PeerBuffer from[] = {p0,           {kInline, i1.size()}, p2, {kInline, i3.size()},
                             {p0.addr, 0}, {kInline, i5.size()}};
  ASSERT_TRUE(link_->CheckRuns(from).ok());

  constexpr size_t kGuard = 64;
  constexpr uint8_t kFill = 0xEE;
  const size_t sizes[] = {d0.size(), i1.size(), d2.size(), i3.size(), 0, i5.size()};
  const bool refused[] = {false, false, true, true, false, false};
  std::vector<std::vector<uint8_t>> mem;
  std::vector<MutableBuffer> into;
  for (size_t i = 0; i < 6; ++i) {
    mem.emplace_back(sizes[i] + 2 * kGuard, kFill);
    into.push_back({refused[i] ? nullptr : mem[i].data() + kGuard, sizes[i]});
  }

  // The client sends the inline payloads in table order (refused ones too: the node cannot know
  // in advance), then the next frame's first bytes.
  std::vector<uint8_t> stream;
  for (const auto* p : {&i1, &i3, &i5}) stream.insert(stream.end(), p->begin(), p->end());
  const std::string next = "NEXT-FRAME";
  stream.insert(stream.end(), next.begin(), next.end());
  Send(pair_.client.get(), stream);

  const Status s = link_->Pull(from, into, Soon());
  ASSERT_TRUE(s.ok()) << s.ToString();

  const std::vector<uint8_t>* want[] = {&d0, &i1, nullptr, nullptr, nullptr, &i5};
  for (size_t i = 0; i < 6; ++i) {
    const std::vector<uint8_t>& m = mem[i];
    if (want[i] != nullptr) {
      EXPECT_TRUE(std::equal(want[i]->begin(), want[i]->end(), m.begin() + kGuard))
          << "entry " << i;
    }
    const size_t filled = want[i] != nullptr ? sizes[i] : 0;
    for (size_t j = 0; j < m.size(); ++j) {
      if (j >= kGuard && j < kGuard + filled) continue;
      ASSERT_EQ(m[j], kFill) << "entry " << i << " byte " << j << " written outside its block";
    }
  }
  // Exactly the inline bytes were consumed: the next frame starts intact, nothing else waits.
  const std::vector<uint8_t> rest = ReadExactly(pair_.node.get(), next.size());
  EXPECT_EQ(std::string(rest.begin(), rest.end()), next);
  EXPECT_TRUE(NothingPending(pair_.node.get()));
  // Pull only reads the client's memory.
  EXPECT_TRUE(std::equal(d0.begin(), d0.end(), At(p0)));
  EXPECT_TRUE(std::equal(d2.begin(), d2.end(), At(p2)));
}

TEST_F(ShmLinkTest, PullOfAnAllDescribedFrameReadsNothingFromTheStream) {
  const auto a = Pattern(4096, 7), b = Pattern(100, 8);
  const PeerBuffer from[] = {Stage(a), Stage(b)};
  ASSERT_TRUE(link_->CheckRuns(from).ok());
  std::vector<uint8_t> ga(a.size()), gb(b.size());
  const MutableBuffer into[] = {{ga.data(), ga.size()}, {gb.data(), gb.size()}};
  Send(pair_.client.get(), {'Z'});
  const Status s = link_->Pull(from, into, Soon());
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(ga, a);
  EXPECT_EQ(gb, b);
  EXPECT_EQ(ReadExactly(pair_.node.get(), 1), std::vector<uint8_t>{'Z'});
}

TEST_F(ShmLinkTest, PullOfADescribedFrameAfterTheClientClosedIsClosed) {
  // A client closes the connection before a failed call returns and may then reuse its memory:
  // a frame copied from it is only good if the client is still connected after the copy.
  const auto a = Pattern(4096, 11), inl = Pattern(50, 12);
  const PeerBuffer from[] = {Stage(a), {kInline, inl.size()}};
  ASSERT_TRUE(link_->CheckRuns(from).ok());
  std::vector<uint8_t> ga(a.size()), gi(inl.size());
  const MutableBuffer into[] = {{ga.data(), ga.size()}, {gi.data(), gi.size()}};
  // Even with the frame's inline bytes all delivered before the close.
  Send(pair_.client.get(), inl);
  pair_.client.Reset();
  const Status s = link_->Pull(from, into, Soon());
  EXPECT_EQ(s.code(), ErrorCode::kClosed) << s.ToString();
}

TEST_F(ShmLinkTest, PullOfAnAllDescribedFrameAfterTheClientClosedIsClosed) {
  const auto a = Pattern(4096, 13);
  const PeerBuffer from[] = {Stage(a)};
  std::vector<uint8_t> ga(a.size());
  const MutableBuffer into[] = {{ga.data(), ga.size()}};
  pair_.client.Reset();
  const Status s = link_->Pull(from, into, Soon());
  EXPECT_EQ(s.code(), ErrorCode::kClosed) << s.ToString();
}

TEST_F(ShmLinkTest, PullAfterAHalfCloseOfADescribedFrameIsClosed) {
  // shutdown(SHUT_WR) is enough: the client has given up on the connection.
  const auto a = Pattern(512, 14);
  const PeerBuffer from[] = {Stage(a)};
  std::vector<uint8_t> ga(a.size());
  const MutableBuffer into[] = {{ga.data(), ga.size()}};
  ASSERT_EQ(shutdown(pair_.client.get(), SHUT_WR), 0);
  const Status s = link_->Pull(from, into, Soon());
  EXPECT_EQ(s.code(), ErrorCode::kClosed) << s.ToString();
}

TEST_F(ShmLinkTest, PullOfAnInlineFrameThatArrivedWholeSurvivesTheClose) {
  // The connection check guards copies of the client's memory only: inline bytes already on the
  // stream are the frame itself.
  const auto inl = Pattern(300, 15);
  const PeerBuffer from[] = {{kInline, inl.size()}};
  std::vector<uint8_t> got(inl.size());
  const MutableBuffer into[] = {{got.data(), got.size()}};
  Send(pair_.client.get(), inl);
  pair_.client.Reset();
  const Status s = link_->Pull(from, into, Soon());
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(got, inl);
}

TEST_F(ShmLinkTest, PullOfATruncatedInlinePayloadIsClosed) {
  const PeerBuffer from[] = {{kInline, 100}};
  std::vector<uint8_t> got(100);
  const MutableBuffer into[] = {{got.data(), got.size()}};
  Send(pair_.client.get(), Pattern(40, 16));
  pair_.client.Reset();
  const Status s = link_->Pull(from, into, Soon());
  EXPECT_EQ(s.code(), ErrorCode::kClosed) << s.ToString();
}

// ---------------------------------------------------------------------------------------------
// Push (GET).

TEST_F(ShmLinkTest, PushWritesExactRunsIntoTheArenaAndTheRestInlineInOrder) {
  constexpr uint8_t kFill = 0x77;
  // Client runs, pre-filled so untouched bytes are visible.
  auto run = [&](size_t n) {
    const MutableBuffer b = arena_->Take(n);
    EXPECT_NE(b.data, nullptr);
    std::memset(b.data, kFill, n);
    return PeerBuffer{*arena_->Offset(b.data, n), n};
  };
  const auto b0 = Pattern(5000, 21), b1 = Pattern(300, 22), b2 = Pattern(1000, 23);
  const auto b4 = Pattern(64, 24), b5 = Pattern(2048, 25);
  const PeerBuffer r0 = run(b0.size()), r2 = run(b2.size() + 1), r3 = run(4096);
  const PeerBuffer r5 = run(b5.size());
  const ConstBuffer blocks[] = {{b0.data(), b0.size()},   // described, exact size: in the arena
                                {b1.data(), b1.size()},   // inline
                                {b2.data(), b2.size()},   // described one byte too big: inline
                                {nullptr, 0},             // absent key, described run
                                {b4.data(), b4.size()},   // inline
                                {b5.data(), b5.size()}};  // described, exact size
  const PeerBuffer to[] = {r0, {kInline, 0}, r2, r3, {kInline, 0}, r5};
  ASSERT_TRUE(link_->CheckRuns(to).ok());
  std::string h0 = "HEADER--", h1 = "LENGTHS-0123456789";
  const iovec head[] = {{h0.data(), h0.size()}, {h1.data(), h1.size()}};

  const Status s = link_->Push(head, blocks, to, Soon());
  ASSERT_TRUE(s.ok()) << s.ToString();

  // The stream carries the head, then the inline blocks in order, and nothing else.
  std::vector<uint8_t> want(h0.begin(), h0.end());
  want.insert(want.end(), h1.begin(), h1.end());
  for (const auto* b : {&b1, &b2, &b4}) want.insert(want.end(), b->begin(), b->end());
  EXPECT_EQ(ReadExactly(pair_.client.get(), want.size()), want);
  EXPECT_TRUE(NothingPending(pair_.client.get()));

  // Exact runs got their blocks; the mis-sized run and the absent key's run are untouched.
  EXPECT_TRUE(std::equal(b0.begin(), b0.end(), At(r0)));
  EXPECT_TRUE(std::equal(b5.begin(), b5.end(), At(r5)));
  for (const PeerBuffer& r : {r2, r3}) {
    for (size_t j = 0; j < r.size; ++j) ASSERT_EQ(At(r)[j], kFill) << r.addr << "+" << j;
  }
}

TEST_F(ShmLinkTest, PushOfAllInlineBlocksSendsEverythingOnTheStream) {
  const auto b0 = Pattern(100, 31), b1 = Pattern(200, 32);
  const ConstBuffer blocks[] = {{b0.data(), b0.size()}, {nullptr, 0}, {b1.data(), b1.size()}};
  const PeerBuffer to[3] = {};
  std::string h = "HEAD";
  const iovec head[] = {{h.data(), h.size()}};
  const Status s = link_->Push(head, blocks, to, Soon());
  ASSERT_TRUE(s.ok()) << s.ToString();
  std::vector<uint8_t> want(h.begin(), h.end());
  want.insert(want.end(), b0.begin(), b0.end());
  want.insert(want.end(), b1.begin(), b1.end());
  EXPECT_EQ(ReadExactly(pair_.client.get(), want.size()), want);
  EXPECT_TRUE(NothingPending(pair_.client.get()));
}

TEST_F(ShmLinkTest, PushAfterTheClientClosedLeavesTheArenaUntouched) {
  // A client that gave up on the frame has closed the connection and may reuse its memory:
  // the node must not write into it.
  constexpr uint8_t kFill = 0x42;
  const MutableBuffer b = arena_->Take(4096);
  ASSERT_NE(b.data, nullptr);
  std::memset(b.data, kFill, b.size);
  const auto block = Pattern(4096, 41);
  const ConstBuffer blocks[] = {{block.data(), block.size()}};
  const PeerBuffer to[] = {{*arena_->Offset(b.data, b.size), b.size}};
  ASSERT_TRUE(link_->CheckRuns(to).ok());
  std::string h = "HEAD";
  const iovec head[] = {{h.data(), h.size()}};
  pair_.client.Reset();
  const Status s = link_->Push(head, blocks, to, Soon());
  EXPECT_EQ(s.code(), ErrorCode::kClosed) << s.ToString();
  for (size_t j = 0; j < b.size; ++j) ASSERT_EQ(b.data[j], kFill) << j;
}

TEST_F(ShmLinkTest, PushWithFewerRunsThanBlocksWritesOnlyTheNamedRuns) {
  // Push accepts a `to` shorter than `blocks` (it sends a block without a run inline), so the
  // copy into the arena must not read runs past the end of `to` either. Disabled: fails today,
  // ShmLink::WritePeer indexes to[i] for every block (cpp/src/transport/shm/shm_link.cc:61)
  // without the i < to.size() guard that Link::Push applies (transport.cc:118).
  const auto b0 = Pattern(100, 61), b1 = Pattern(200, 62);
  const MutableBuffer r0 = arena_->Take(100), r1 = arena_->Take(200);
  ASSERT_NE(r0.data, nullptr);
  ASSERT_NE(r1.data, nullptr);
  std::memset(r1.data, 0x11, r1.size);
  // Two runs in memory; Push is handed only the first (to.size() == 1 < blocks.size() == 2).
  const PeerBuffer storage[] = {{*arena_->Offset(r0.data, r0.size), r0.size},
                                {*arena_->Offset(r1.data, r1.size), r1.size}};
  const std::span<const PeerBuffer> to(storage, 1);
  const ConstBuffer blocks[] = {{b0.data(), b0.size()}, {b1.data(), b1.size()}};
  std::string h = "H";
  const iovec head[] = {{h.data(), h.size()}};
  const Status s = link_->Push(head, blocks, to, Soon());
  ASSERT_TRUE(s.ok()) << s.ToString();
  std::vector<uint8_t> want(h.begin(), h.end());
  want.insert(want.end(), b1.begin(), b1.end());
  EXPECT_EQ(ReadExactly(pair_.client.get(), want.size()), want);
  EXPECT_TRUE(std::equal(b0.begin(), b0.end(), r0.data));
  // Block 1 went inline; the memory the frame never named is untouched.
  for (size_t j = 0; j < r1.size; ++j) ASSERT_EQ(r1.data[j], 0x11) << j;
}

// ---------------------------------------------------------------------------------------------
// TcpLink and the transport helpers.

TEST(TcpLink, CheckRunsRefusesDescribedRunsAndAcceptsInline) {
  StreamPair pair;
  TcpLink link(pair.node.get());
  EXPECT_EQ(link.kind(), TransportKind::kTcp);
  const PeerBuffer inline_only[] = {{kInline, 100}, {kInline, 0}, {kInline, UINT64_MAX}};
  EXPECT_TRUE(link.CheckRuns(inline_only).ok());
  EXPECT_TRUE(link.CheckRuns({}).ok());
  const PeerBuffer described[] = {{kInline, 100}, {0, 100}};
  const Status s = link.CheckRuns(described);
  EXPECT_EQ(s.code(), ErrorCode::kBadFrame);
  EXPECT_TRUE(Contains(s, "entry 1")) << s.ToString();
  EXPECT_TRUE(Contains(s, "tcp")) << s.ToString();
  const PeerBuffer empty_run[] = {{0, 0}};
  EXPECT_EQ(link.CheckRuns(empty_run).code(), ErrorCode::kBadFrame);
}

TEST(TcpLink, PullAndPushMoveInlinePayloadsOnTheStream) {
  StreamPair pair;
  TcpLink link(pair.node.get());
  const auto a = Pattern(1000, 51), refused = Pattern(300, 52), c = Pattern(10, 53);
  std::vector<uint8_t> stream(a);
  stream.insert(stream.end(), refused.begin(), refused.end());
  stream.insert(stream.end(), c.begin(), c.end());
  stream.push_back('!');
  Send(pair.client.get(), stream);
  const PeerBuffer from[] = {{kInline, a.size()}, {kInline, refused.size()}, {kInline, c.size()}};
  std::vector<uint8_t> ga(a.size()), gc(c.size());
  const MutableBuffer into[] = {
      {ga.data(), ga.size()}, {nullptr, refused.size()}, {gc.data(), gc.size()}};
  const Status pulled = link.Pull(from, into, Soon());
  ASSERT_TRUE(pulled.ok()) << pulled.ToString();
  EXPECT_EQ(ga, a);
  EXPECT_EQ(gc, c);
  EXPECT_EQ(ReadExactly(pair.node.get(), 1), std::vector<uint8_t>{'!'});

  const ConstBuffer blocks[] = {{a.data(), a.size()}, {nullptr, 0}, {c.data(), c.size()}};
  const PeerBuffer to[3] = {};
  std::string h = "HD";
  const iovec head[] = {{h.data(), h.size()}};
  const Status pushed = link.Push(head, blocks, to, Soon());
  ASSERT_TRUE(pushed.ok()) << pushed.ToString();
  std::vector<uint8_t> want(h.begin(), h.end());
  want.insert(want.end(), a.begin(), a.end());
  want.insert(want.end(), c.begin(), c.end());
  EXPECT_EQ(ReadExactly(pair.client.get(), want.size()), want);
}

TEST(Transport, DeliveredInPeerOnlyForAnExactlySizedDescribedRun) {
  EXPECT_TRUE(DeliveredInPeer({0, 100}, 100));
  EXPECT_FALSE(DeliveredInPeer({0, 101}, 100));
  EXPECT_FALSE(DeliveredInPeer({0, 99}, 100));
  EXPECT_FALSE(DeliveredInPeer({kInline, 100}, 100));
  EXPECT_TRUE(DeliveredInPeer({4096, 0}, 0));
  EXPECT_FALSE(PeerBuffer{}.described());
}

TEST(Transport, KindNamesRoundTripAndABadNameIsNamed) {
  for (auto kind : {TransportKind::kTcp, TransportKind::kShm, TransportKind::kRdma}) {
    const auto parsed = ParseTransportKind(TransportKindName(kind));
    ASSERT_TRUE(parsed.ok()) << TransportKindName(kind);
    EXPECT_EQ(parsed.value(), kind);
  }
  EXPECT_STREQ(TransportKindName(TransportKind::kShm), "shm");
  const auto bad = ParseTransportKind("SHM");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_TRUE(Contains(bad.status(), "'SHM'")) << bad.status().ToString();
  EXPECT_FALSE(ParseTransportKind("").ok());
}

}  // namespace
}  // namespace kvpool
