// The software verbs provider (verbs.h): the semantics the RDMA transport relies on, checked
// between QPs of this process and against a peer process that exits.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include "transport/rdma/verbs.h"

namespace kvpool::rdma {
namespace {

template <typename T>
T Take(Result<T> r) {
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return std::move(r.value());
}

net::Deadline Soon() { return net::Deadline::In(std::chrono::milliseconds(100)); }

struct Pair {
  std::unique_ptr<Device> dev = Take(OpenSoftDevice());
  std::unique_ptr<QueuePair> a = Take(dev->CreateQp(8));
  std::unique_ptr<QueuePair> b = Take(dev->CreateQp(8));
  Pair() {
    EXPECT_TRUE(a->Connect(b->address()).ok());
    EXPECT_TRUE(b->Connect(a->address()).ok());
  }
};

WorkRequest Wr(Opcode op, const MemoryRegion& local, const MemoryRegion& remote, uint64_t n,
               uint64_t id = 1) {
  WorkRequest wr;
  wr.wr_id = id;
  wr.opcode = op;
  wr.local_addr = local.addr;
  wr.lkey = local.lkey;
  wr.length = n;
  wr.remote_addr = remote.addr;
  wr.rkey = remote.rkey;
  return wr;
}

std::vector<Completion> PollAll(QueuePair& qp) {
  std::vector<Completion> out(16);
  auto n = qp.Poll(out, Soon());
  out.resize(n.ok() ? n.value() : 0);
  return out;
}

// One-sided READ and WRITE move exactly the named bytes; the QP moves RESET -> RTS on Connect.
TEST(RdmaSoftVerbs, ReadAndWriteMoveTheBytes) {
  Pair p;
  EXPECT_EQ(p.a->state(), QpState::kRts);
  std::vector<uint8_t> pool(4096, 0), arena(4096);
  for (size_t i = 0; i < arena.size(); ++i) arena[i] = static_cast<uint8_t>(i * 7);
  auto local = p.dev->Register(pool.data(), pool.size(), kLocalWrite).value();
  auto remote = p.dev->Register(arena.data(), arena.size(), kRemoteRead | kRemoteWrite).value();
  ASSERT_TRUE(p.a->Post(std::vector{Wr(Opcode::kRead, local, remote, 4096)}).ok());
  auto c = PollAll(*p.a);
  ASSERT_EQ(c.size(), 1u);
  EXPECT_EQ(c[0].status, WcStatus::kSuccess);
  EXPECT_EQ(c[0].bytes, 4096u);
  EXPECT_EQ(pool, arena);
  std::fill(pool.begin(), pool.end(), 0xab);
  ASSERT_TRUE(p.a->Post(std::vector{Wr(Opcode::kWrite, local, remote, 100, 2)}).ok());
  c = PollAll(*p.a);
  ASSERT_EQ(c.size(), 1u);
  EXPECT_EQ(c[0].wr_id, 2u);
  EXPECT_EQ(arena[99], 0xab);
  EXPECT_EQ(arena[100], static_cast<uint8_t>(100 * 7));
}

// A bad rkey, a range past the region and a missing access right are remote access errors; the
// QP goes to ERROR, the requests behind the error are flushed, and new work is refused.
TEST(RdmaSoftVerbs, RemoteErrorsFlushTheRestAndStopTheQp) {
  for (int fault = 0; fault < 3; ++fault) {
    Pair p;
    std::vector<uint8_t> pool(8192), arena(4096);
    auto local = p.dev->Register(pool.data(), pool.size(), kLocalWrite).value();
    auto remote = p.dev->Register(arena.data(), arena.size(), kRemoteRead).value();
    WorkRequest bad = Wr(Opcode::kRead, local, remote, 4096, 1);
    if (fault == 0) bad.rkey ^= 0x100;            // another generation's key
    if (fault == 1) bad.length = 4097;            // past the remote region
    if (fault == 2) bad.opcode = Opcode::kWrite;  // the region grants no remote write
    WorkRequest after = Wr(Opcode::kRead, local, remote, 16, 2);
    ASSERT_TRUE(p.a->Post(std::vector{bad, after}).ok());
    auto c = PollAll(*p.a);
    ASSERT_EQ(c.size(), 2u) << fault;
    EXPECT_EQ(c[0].status, WcStatus::kRemoteAccess) << fault;
    EXPECT_EQ(c[1].status, WcStatus::kFlushed) << fault;
    EXPECT_EQ(p.a->state(), QpState::kError);
    EXPECT_EQ(p.a->Post(std::vector{after}).code(), ErrorCode::kProtocol);
  }
}

// The local side is checked too: a bad lkey is a protection error, a range past it a length
// error, and a READ into a region without local write access is refused.
TEST(RdmaSoftVerbs, LocalErrors) {
  Pair p;
  std::vector<uint8_t> pool(4096), arena(4096);
  auto ro = p.dev->Register(pool.data(), pool.size(), 0).value();
  auto local = p.dev->Register(pool.data(), pool.size(), kLocalWrite).value();
  auto remote = p.dev->Register(arena.data(), arena.size(), kRemoteRead | kRemoteWrite).value();
  struct Case {
    WorkRequest wr;
    WcStatus want;
  };
  WorkRequest bad_key = Wr(Opcode::kRead, local, remote, 16);
  bad_key.lkey = 0;
  WorkRequest too_long = Wr(Opcode::kRead, local, remote, 4096);
  too_long.local_addr += 1;
  for (const Case& c :
       {Case{bad_key, WcStatus::kLocalProtection}, Case{too_long, WcStatus::kLocalLength},
        Case{Wr(Opcode::kRead, ro, remote, 16), WcStatus::kLocalProtection}}) {
    Pair q;
    ASSERT_TRUE(q.a->Post(std::vector{c.wr}).ok());
    auto got = PollAll(*q.a);
    ASSERT_EQ(got.size(), 1u);
    EXPECT_EQ(got[0].status, c.want) << WcStatusName(got[0].status);
  }
}

// A deregistered region is gone for the peer at once.
TEST(RdmaSoftVerbs, DeregisteredRegionIsARemoteAccessError) {
  Pair p;
  std::vector<uint8_t> pool(64), arena(64);
  auto local = p.dev->Register(pool.data(), pool.size(), kLocalWrite).value();
  auto remote = p.dev->Register(arena.data(), arena.size(), kRemoteRead).value();
  p.dev->Deregister(remote);
  ASSERT_TRUE(p.a->Post(std::vector{Wr(Opcode::kRead, local, remote, 64)}).ok());
  auto c = PollAll(*p.a);
  ASSERT_EQ(c.size(), 1u);
  EXPECT_EQ(c[0].status, WcStatus::kRemoteAccess);
}

// Unsignalled requests report nothing but hold their send-queue slot until a later signalled
// completion is polled (selective signalling), and posting past the queue is refused.
TEST(RdmaSoftVerbs, SelectiveSignallingAndQueueBound) {
  Pair p;
  std::vector<uint8_t> pool(64), arena(64);
  auto local = p.dev->Register(pool.data(), pool.size(), kLocalWrite).value();
  auto remote = p.dev->Register(arena.data(), arena.size(), kRemoteRead).value();
  std::vector<WorkRequest> batch;
  for (int i = 0; i < 8; ++i) {
    batch.push_back(Wr(Opcode::kRead, local, remote, 8, i));
    batch.back().signaled = i == 7;
  }
  ASSERT_TRUE(p.a->Post(batch).ok());
  EXPECT_EQ(p.a->Post(std::vector{batch[0]}).code(), ErrorCode::kProtocol);  // 8 of 8 used
  auto c = PollAll(*p.a);
  ASSERT_EQ(c.size(), 1u);
  EXPECT_EQ(c[0].wr_id, 7u);
  EXPECT_TRUE(p.a->Post(std::vector{batch[0]}).ok());  // the poll retired all eight
  std::vector<Completion> none(4);
  EXPECT_EQ(p.a->Poll(none, Soon()).status().code(), ErrorCode::kTimeout);
}

// Work before Connect, a second Connect, and a peer that cannot be reached are errors.
TEST(RdmaSoftVerbs, QpStateMachine) {
  auto dev = Take(OpenSoftDevice());
  auto a = Take(dev->CreateQp(4));
  auto b = Take(dev->CreateQp(4));
  EXPECT_EQ(a->state(), QpState::kReset);
  EXPECT_EQ(a->Post(std::vector<WorkRequest>(1)).code(), ErrorCode::kProtocol);
  QpAddress nowhere = b->address();
  nowhere.soft_table = 8;  // not a table
  EXPECT_EQ(a->Connect(nowhere).code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(a->state(), QpState::kError);
  ASSERT_TRUE(b->Connect(b->address()).ok());
  EXPECT_EQ(b->Connect(b->address()).code(), ErrorCode::kProtocol);
  EXPECT_EQ(dev->CreateQp(0).status().code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(dev->Register(nullptr, 10, kLocalWrite).status().code(), ErrorCode::kInvalidArgument);
}

// A peer process that exits: the next READ completes with a retry-exceeded error (RC gives up),
// the QP goes to ERROR, and the local memory is untouched.
TEST(RdmaSoftVerbs, VanishedPeerIsRetryExceeded) {
  int to_parent[2], to_child[2];
  ASSERT_EQ(pipe(to_parent), 0);
  ASSERT_EQ(pipe(to_child), 0);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto dev = Take(OpenSoftDevice());
    static uint8_t arena[4096];
    std::memset(arena, 0x5a, sizeof arena);
    auto mr = dev->Register(arena, sizeof arena, kRemoteRead | kRemoteWrite).value();
    auto qp = Take(dev->CreateQp(4));
    QpAddress addr = qp->address();
    (void)!write(to_parent[1], &addr, sizeof addr);
    (void)!write(to_parent[1], &mr, sizeof mr);
    char go;
    (void)!read(to_child[0], &go, 1);  // wait for the parent's first read, then vanish
    _exit(0);
  }
  QpAddress peer;
  MemoryRegion remote;
  ASSERT_EQ(read(to_parent[0], &peer, sizeof peer), static_cast<ssize_t>(sizeof peer));
  ASSERT_EQ(read(to_parent[0], &remote, sizeof remote), static_cast<ssize_t>(sizeof remote));
  auto dev = Take(OpenSoftDevice());
  std::vector<uint8_t> pool(4096, 0);
  auto local = dev->Register(pool.data(), pool.size(), kLocalWrite).value();
  auto qp = Take(dev->CreateQp(4));
  ASSERT_TRUE(qp->Connect(peer).ok());
  ASSERT_TRUE(qp->Post(std::vector{Wr(Opcode::kRead, local, remote, 4096)}).ok());
  auto c = PollAll(*qp);
  ASSERT_EQ(c.size(), 1u);
  EXPECT_EQ(c[0].status, WcStatus::kSuccess);
  EXPECT_EQ(pool[4095], 0x5a);  // across processes
  (void)!write(to_child[1], "x", 1);
  int status;
  waitpid(child, &status, 0);
  std::fill(pool.begin(), pool.end(), 0);
  ASSERT_TRUE(qp->Post(std::vector{Wr(Opcode::kRead, local, remote, 4096, 9)}).ok());
  c = PollAll(*qp);
  ASSERT_EQ(c.size(), 1u);
  EXPECT_EQ(c[0].status, WcStatus::kRetryExceeded) << WcStatusName(c[0].status);
  EXPECT_EQ(qp->state(), QpState::kError);
  EXPECT_EQ(pool[0], 0);
}

}  // namespace
}  // namespace kvpool::rdma
