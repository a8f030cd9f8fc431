// The software verbs provider: see verbs.h. One table of registered regions per process, which
// peers read (process_vm_readv) to check a remote key, range and access before every transfer,
// as a NIC checks them against its own translation tables.
#include <sys/prctl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>

#include "transport/rdma/verbs.h"

namespace kvpool::rdma {

namespace {

constexpr uint64_t kTableMagic = 0x4b56504f4f4c5254;  // "TRLOOPVK"
constexpr size_t kSlots = 256;

struct Entry {
  uint64_t addr = 0;
  uint64_t length = 0;
  uint32_t key = 0;  // (generation << 8) | slot; 0 = free
  uint32_t access = 0;
};

/// This process's registered regions. Peers read it; only this process writes it.
struct Table {
  uint64_t magic = kTableMagic;
  Entry entries[kSlots];
};

Table g_table;
std::mutex g_table_mu;
uint32_t g_generation = 0;

bool Covers(const Entry& e, uint32_t key, uint64_t addr, uint64_t length, uint32_t access) {
  return e.key == key && key != 0 && addr >= e.addr && length <= e.length &&
         addr - e.addr <= e.length - length && (e.access & access) == access;
}

class SoftQp final : public QueuePair {
 public:
  explicit SoftQp(size_t max_outstanding) : max_(max_outstanding) {
    static std::atomic<uint32_t> next{1};
    address_.qp_num = next++;
    address_.soft_pid = static_cast<uint64_t>(getpid());
    address_.soft_table = reinterpret_cast<uint64_t>(&g_table);
  }

  QpAddress address() const override { return address_; }
  QpState state() const override { return state_; }
  size_t max_outstanding() const override { return max_; }
  // Work runs inside Post: nothing is ever in flight once it returns.
  void Quiesce() override { state_ = QpState::kError; }

  Status Connect(const QpAddress& remote) override {
    if (state_ != QpState::kReset) {
      return Status(ErrorCode::kProtocol,
                    std::string("Connect on a QP in state ") + QpStateName(state_));
    }
    state_ = QpState::kInit;
    uint64_t magic = 0;
    if (!ReadRemote(remote, remote.soft_table, &magic, sizeof magic) || magic != kTableMagic) {
      state_ = QpState::kError;
      return Status(ErrorCode::kInvalidArgument, "cannot reach the software RDMA peer (pid " +
                                                     std::to_string(remote.soft_pid) +
                                                     "): " + std::strerror(errno ? errno : EINVAL));
    }
    remote_ = remote;
    state_ = QpState::kRtr;
    state_ = QpState::kRts;
    return Status::Ok();
  }

  Status Post(std::span<const WorkRequest> requests) override {
    KVPOOL_RETURN_IF_ERROR(CheckPost(state_, posted_ - retired_, requests.size(), max_));
    // Executed in order, now: a real NIC runs them later, but the completions say the same.
    for (const WorkRequest& wr : requests) {
      const uint64_t seq = ++posted_;
      const WcStatus status = state_ == QpState::kError ? WcStatus::kFlushed : Execute(wr);
      if (status != WcStatus::kSuccess) state_ = QpState::kError;
      if (status != WcStatus::kSuccess || wr.signaled) {
        completions_.push_back(
            {{wr.wr_id, status, wr.opcode, status == WcStatus::kSuccess ? wr.length : 0}, seq});
      }
    }
    return Status::Ok();
  }

  Result<size_t> Poll(std::span<Completion> out, net::Deadline deadline) override {
    size_t n = 0;
    while (n < out.size() && !completions_.empty()) {
      out[n++] = completions_.front().first;
      retired_ = completions_.front().second;  // a completion retires everything before it
      completions_.pop_front();
    }
    if (n == 0) {
      return Status(ErrorCode::kTimeout, "no completion (" + std::to_string(posted_ - retired_) +
                                             " outstanding, none signalled)");
    }
    return n;
  }

 private:
  static bool ReadRemote(const QpAddress& remote, uint64_t addr, void* into, size_t n) {
    errno = 0;
    iovec local{into, n};
    iovec far{reinterpret_cast<void*>(addr), n};
    return process_vm_readv(static_cast<pid_t>(remote.soft_pid), &local, 1, &far, 1, 0) ==
           static_cast<ssize_t>(n);
  }

  /// Fault injection for tests: KVPOOL_RDMA_SOFT_FAIL_EVERY=N fails every Nth request of this
  /// process with a remote access error (as a corrupted key would).
  static bool InjectFault() {
    static const uint64_t every = [] {
      const char* v = std::getenv("KVPOOL_RDMA_SOFT_FAIL_EVERY");
      return v != nullptr ? std::strtoull(v, nullptr, 10) : 0;
    }();
    static std::atomic<uint64_t> count{0};
    return every != 0 && ++count % every == 0;
  }

  WcStatus Execute(const WorkRequest& wr) {
    if (InjectFault()) return WcStatus::kRemoteAccess;
    const uint32_t need_local = wr.opcode == Opcode::kRead ? uint32_t{kLocalWrite} : 0u;
    {
      std::lock_guard<std::mutex> lock(g_table_mu);
      const Entry& e = g_table.entries[wr.lkey % kSlots];
      if (e.key != wr.lkey || wr.lkey == 0 || (e.access & need_local) != need_local) {
        return WcStatus::kLocalProtection;
      }
      if (!Covers(e, wr.lkey, wr.local_addr, wr.length, need_local)) return WcStatus::kLocalLength;
    }
    // The remote side's check, against its table as it is now.
    Entry remote;
    const uint64_t slot =
        remote_.soft_table + offsetof(Table, entries) + (wr.rkey % kSlots) * sizeof(Entry);
    if (!ReadRemote(remote_, slot, &remote, sizeof remote)) {
      return errno == ESRCH || errno == EPERM ? WcStatus::kRetryExceeded : WcStatus::kGeneral;
    }
    const uint32_t need_remote =
        wr.opcode == Opcode::kRead ? uint32_t{kRemoteRead} : uint32_t{kRemoteWrite};
    if (!Covers(remote, wr.rkey, wr.remote_addr, wr.length, need_remote)) {
      return WcStatus::kRemoteAccess;
    }
    iovec local{reinterpret_cast<void*>(wr.local_addr), wr.length};
    iovec far{reinterpret_cast<void*>(wr.remote_addr), wr.length};
    const auto pid = static_cast<pid_t>(remote_.soft_pid);
    const ssize_t moved = wr.opcode == Opcode::kRead
                              ? process_vm_readv(pid, &local, 1, &far, 1, 0)
                              : process_vm_writev(pid, &local, 1, &far, 1, 0);
    if (moved == static_cast<ssize_t>(wr.length)) return WcStatus::kSuccess;
    if (moved < 0 && (errno == ESRCH || errno == EPERM)) return WcStatus::kRetryExceeded;
    return WcStatus::kRemoteAccess;  // a range that is registered but no longer mapped
  }

  size_t max_;
  QpAddress address_;
  QpAddress remote_;
  QpState state_ = QpState::kReset;
  uint64_t posted_ = 0, retired_ = 0;
  std::deque<std::pair<Completion, uint64_t>> completions_;
};

class SoftDevice final : public Device {
 public:
  const std::string& name() const override { return name_; }
  const std::string& description() const override { return description_; }
  bool software() const override { return true; }

  Result<MemoryRegion> Register(void* addr, size_t length, uint32_t access) override {
    if (addr == nullptr || length == 0) {
      return Status(ErrorCode::kInvalidArgument, "cannot register an empty region");
    }
    std::lock_guard<std::mutex> lock(g_table_mu);
    for (size_t slot = 1; slot < kSlots; ++slot) {  // slot 0 stays free: key 0 is never valid
      Entry& e = g_table.entries[slot];
      if (e.key != 0) continue;
      const uint32_t generation = (++g_generation & 0xffffff) | 1;
      e.addr = reinterpret_cast<uint64_t>(addr);
      e.length = length;
      e.access = access;
      e.key = (generation << 8) | static_cast<uint32_t>(slot);
      return MemoryRegion{e.addr, e.length, e.key, e.key, access};
    }
    return Status(ErrorCode::kNoSpace,
                  "all " + std::to_string(kSlots - 1) + " software memory-region slots are in use");
  }

  void Deregister(const MemoryRegion& region) override {
    std::lock_guard<std::mutex> lock(g_table_mu);
    Entry& e = g_table.entries[region.lkey % kSlots];
    if (e.key == region.lkey) e = Entry{};
  }

  Result<std::unique_ptr<QueuePair>> CreateQp(size_t max_outstanding) override {
    if (max_outstanding == 0) {
      return Status(ErrorCode::kInvalidArgument, "a QP needs room for at least one request");
    }
    return std::unique_ptr<QueuePair>(new SoftQp(max_outstanding));
  }

 private:
  std::string name_ = "soft0";
  std::string description_ = "soft0 (the software provider: peers on this host only)";
};

}  // namespace

Result<std::unique_ptr<Device>> OpenSoftDevice() {
  // Peers move bytes with process_vm_readv/writev, which Yama (ptrace_scope 1) allows only to
  // ancestors; a process that opts into the software provider lets any peer of its uid in, as a
  // NIC would. Without Yama this changes nothing.
  prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0);
  return std::unique_ptr<Device>(new SoftDevice());
}

}  // namespace kvpool::rdma
