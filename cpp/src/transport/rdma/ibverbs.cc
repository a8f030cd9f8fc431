// The libibverbs provider (see verbs.h), over libibverbs loaded at run time. Only entry points
// that libibverbs exports are looked up; posting and polling are the inline wrappers of the
// rdma-core headers (they call through the device context's ops table), so the data path pays
// no indirection of ours.
#include "transport/rdma/ibverbs.h"

#if KVPOOL_HAVE_IBVERBS
#include <dlfcn.h>
#include <infiniband/verbs.h>
#include <sys/resource.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>
#include <unordered_map>
#endif

namespace kvpool::rdma {

#if KVPOOL_HAVE_IBVERBS
namespace {

/// The exported libibverbs entry points kvpool uses.
struct Library {
  void* handle = nullptr;
  std::string error;
  decltype(&ibv_get_device_list) get_device_list = nullptr;
  decltype(&ibv_free_device_list) free_device_list = nullptr;
  decltype(&ibv_get_device_name) get_device_name = nullptr;
  decltype(&ibv_open_device) open_device = nullptr;
  decltype(&ibv_close_device) close_device = nullptr;
  decltype(&ibv_query_device) query_device = nullptr;
  int (*query_port)(ibv_context*, uint8_t, _compat_ibv_port_attr*) = nullptr;
  decltype(&ibv_query_gid) query_gid = nullptr;
  decltype(&ibv_alloc_pd) alloc_pd = nullptr;
  decltype(&ibv_dealloc_pd) dealloc_pd = nullptr;
  ibv_mr* (*reg_mr)(ibv_pd*, void*, size_t, int) = nullptr;
  decltype(&ibv_reg_mr_iova2) reg_mr_iova2 = nullptr;  ///< IBVERBS_1.8; optional
  decltype(&ibv_dereg_mr) dereg_mr = nullptr;
  decltype(&ibv_create_cq) create_cq = nullptr;
  decltype(&ibv_destroy_cq) destroy_cq = nullptr;
  decltype(&ibv_create_qp) create_qp = nullptr;
  decltype(&ibv_modify_qp) modify_qp = nullptr;
  decltype(&ibv_destroy_qp) destroy_qp = nullptr;
  decltype(&ibv_fork_init) fork_init = nullptr;
  decltype(&ibv_is_fork_initialized) is_fork_initialized = nullptr;  ///< IBVERBS_1.13; optional
};

template <typename Fn>
bool Bind(void* handle, const char* name, Fn* out) {
  *out = reinterpret_cast<Fn>(dlsym(handle, name));
  return *out != nullptr;
}

const Library& Load() {
  static Library lib;
  static std::once_flag once;
  std::call_once(once, [] {
    lib.handle = dlopen("libibverbs.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib.handle == nullptr) {
      const char* e = dlerror();
      lib.error = std::string("libibverbs.so.1 not loadable (apt-get install libibverbs1): ") +
                  (e != nullptr ? e : "unknown error");
      return;
    }
    void* h = lib.handle;
    const bool all =
        Bind(h, "ibv_get_device_list", &lib.get_device_list) &&
        Bind(h, "ibv_free_device_list", &lib.free_device_list) &&
        Bind(h, "ibv_get_device_name", &lib.get_device_name) &&
        Bind(h, "ibv_open_device", &lib.open_device) &&
        Bind(h, "ibv_close_device", &lib.close_device) &&
        Bind(h, "ibv_query_device", &lib.query_device) &&
        Bind(h, "ibv_query_port", &lib.query_port) && Bind(h, "ibv_query_gid", &lib.query_gid) &&
        Bind(h, "ibv_alloc_pd", &lib.alloc_pd) && Bind(h, "ibv_dealloc_pd", &lib.dealloc_pd) &&
        Bind(h, "ibv_reg_mr", &lib.reg_mr) && Bind(h, "ibv_dereg_mr", &lib.dereg_mr) &&
        Bind(h, "ibv_create_cq", &lib.create_cq) && Bind(h, "ibv_destroy_cq", &lib.destroy_cq) &&
        Bind(h, "ibv_create_qp", &lib.create_qp) && Bind(h, "ibv_modify_qp", &lib.modify_qp) &&
        Bind(h, "ibv_destroy_qp", &lib.destroy_qp) && Bind(h, "ibv_fork_init", &lib.fork_init);
    Bind(h, "ibv_reg_mr_iova2", &lib.reg_mr_iova2);
    Bind(h, "ibv_is_fork_initialized", &lib.is_fork_initialized);
    if (!all) {
      lib.error = "libibverbs.so.1 lacks the verbs entry points (too old an rdma-core?)";
      lib.handle = nullptr;
      return;
    }
    // Engines fork (vLLM's workers): on kernels that do not keep registered pages in the
    // parent across fork, libibverbs must be told before anything is registered.
    if (lib.is_fork_initialized == nullptr || lib.is_fork_initialized() != IBV_FORK_UNNEEDED) {
      lib.fork_init();
    }
  });
  return lib;
}

std::string Errno(int err) { return std::strerror(err != 0 ? err : EIO); }

/// The port's attributes as the headers' ibv_query_port gets them: the extended op when the
/// provider has one, else the exported call (which fills the older, shorter struct).
int QueryPort(const Library& lib, ibv_context* ctx, uint8_t port, ibv_port_attr* attr) {
  std::memset(attr, 0, sizeof *attr);
  verbs_context* vctx = verbs_get_ctx_op(ctx, query_port);
  if (vctx != nullptr) return vctx->query_port(ctx, port, attr, sizeof *attr);
  return lib.query_port(ctx, port, reinterpret_cast<_compat_ibv_port_attr*>(attr));
}

WcStatus FromWc(ibv_wc_status s) {
  switch (s) {
    case IBV_WC_SUCCESS:
      return WcStatus::kSuccess;
    case IBV_WC_LOC_LEN_ERR:
      return WcStatus::kLocalLength;
    case IBV_WC_LOC_PROT_ERR:
      return WcStatus::kLocalProtection;
    case IBV_WC_REM_ACCESS_ERR:
    case IBV_WC_REM_INV_REQ_ERR:
      return WcStatus::kRemoteAccess;
    case IBV_WC_RETRY_EXC_ERR:
    case IBV_WC_RNR_RETRY_EXC_ERR:
      return WcStatus::kRetryExceeded;
    case IBV_WC_WR_FLUSH_ERR:
      return WcStatus::kFlushed;
    default:
      return WcStatus::kGeneral;
  }
}

/// An opened device with its protection domain; shared by its regions and queue pairs, which
/// must go before it.
struct Context {
  const Library* lib = nullptr;
  ibv_context* ctx = nullptr;
  ibv_pd* pd = nullptr;
  ibv_device_attr device{};
  ibv_port_attr port{};
  Selection selection;
  ibv_gid gid{};

  ~Context() {
    if (pd != nullptr) lib->dealloc_pd(pd);
    if (ctx != nullptr) lib->close_device(ctx);
  }
};

class VerbsQp final : public QueuePair {
 public:
  VerbsQp(std::shared_ptr<Context> c, ibv_cq* cq, ibv_qp* qp, size_t max_outstanding)
      : c_(std::move(c)), cq_(cq), qp_(qp), max_(max_outstanding), posted_ring_(max_outstanding) {
    address_.qp_num = qp_->qp_num;
    address_.psn = std::random_device{}() & 0xffffff;
    address_.lid = c_->port.lid;
    std::memcpy(address_.gid.data(), c_->gid.raw, 16);
    address_.mtu = static_cast<uint8_t>(std::min(c_->port.active_mtu, IBV_MTU_4096));
    address_.rd_atomic = static_cast<uint8_t>(std::clamp(c_->device.max_qp_rd_atom, 1, 16));
    wcs_.resize(std::min<size_t>(max_, 64));
  }

  ~VerbsQp() override {
    if (qp_ != nullptr) c_->lib->destroy_qp(qp_);
    c_->lib->destroy_cq(cq_);
  }

  QpAddress address() const override { return address_; }
  QpState state() const override { return state_; }
  size_t max_outstanding() const override { return max_; }

  void Quiesce() override {
    state_ = QpState::kError;
    if (qp_ == nullptr) return;
    // In the error state the device flushes what is queued; once every posted request has
    // completed (the flush of the last one retires all), none of them touches memory again.
    ibv_qp_attr a{};
    a.qp_state = IBV_QPS_ERR;
    if (c_->lib->modify_qp(qp_, &a, IBV_QP_STATE) == 0) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
      while (retired_ < posted_ && std::chrono::steady_clock::now() < until) {
        const int n = ibv_poll_cq(cq_, static_cast<int>(wcs_.size()), wcs_.data());
        if (n < 0) break;
        for (int i = 0; i < n; ++i) retired_ = std::max(retired_, wcs_[i].wr_id);
      }
    }
    if (retired_ < posted_) {
      // No flush in time: destroying the QP is what stops the device for certain.
      c_->lib->destroy_qp(qp_);
      qp_ = nullptr;
    }
  }

  Status Connect(const QpAddress& remote) override {
    if (state_ != QpState::kReset) {
      return Status(ErrorCode::kProtocol,
                    std::string("Connect on a QP in state ") + QpStateName(state_));
    }
    const Selection& s = c_->selection;
    const bool ethernet = s.link == LinkType::kEthernet;
    static constexpr std::array<uint8_t, 16> kNoGid{};
    if (remote.qp_num == 0 || (ethernet ? remote.gid == kNoGid : remote.lid == 0)) {
      return Status(ErrorCode::kInvalidArgument,
                    std::string("the peer's QP address has no ") +
                        (ethernet ? "GID (is it on the software provider, or IB?)"
                                  : "LID (is it on the software provider, or RoCE?)"));
    }
    ibv_qp_attr a{};
    a.qp_state = IBV_QPS_INIT;
    a.pkey_index = 0;
    a.port_num = static_cast<uint8_t>(s.port);
    // The client's QP is the responder of the node's READs and WRITEs.
    a.qp_access_flags = IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_WRITE;
    KVPOOL_RETURN_IF_ERROR(
        Modify(a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS, "INIT"));
    a = {};
    a.qp_state = IBV_QPS_RTR;
    // Both ends must use one path MTU: the smaller of the two ports' (each says its own).
    a.path_mtu = static_cast<ibv_mtu>(address_.mtu);
    if (remote.mtu != 0) a.path_mtu = std::min(a.path_mtu, static_cast<ibv_mtu>(remote.mtu));
    a.dest_qp_num = remote.qp_num;
    a.rq_psn = remote.psn;
    a.max_dest_rd_atomic = address_.rd_atomic;
    a.min_rnr_timer = 12;
    a.ah_attr.port_num = static_cast<uint8_t>(s.port);
    if (ethernet || (c_->port.flags & IBV_QPF_GRH_REQUIRED)) {
      a.ah_attr.is_global = 1;
      std::memcpy(a.ah_attr.grh.dgid.raw, remote.gid.data(), 16);
      a.ah_attr.grh.sgid_index = static_cast<uint8_t>(s.gid_index);
      a.ah_attr.grh.hop_limit = 64;  // RoCE v2 is routable
    }
    if (!ethernet) a.ah_attr.dlid = remote.lid;
    KVPOOL_RETURN_IF_ERROR(Modify(a,
                                  IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN |
                                      IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC |
                                      IBV_QP_MIN_RNR_TIMER,
                                  "RTR"));
    a = {};
    a.qp_state = IBV_QPS_RTS;
    a.timeout = 14;  // 4.096 us * 2^14 = 67 ms per try
    a.retry_cnt = 7;
    a.rnr_retry = 7;
    a.sq_psn = address_.psn;
    // As initiator, at most as many READs in flight as the peer accepts as responder.
    int depth = std::clamp(c_->device.max_qp_init_rd_atom, 1, 16);
    if (remote.rd_atomic != 0) depth = std::min<int>(depth, remote.rd_atomic);
    a.max_rd_atomic = static_cast<uint8_t>(depth);
    KVPOOL_RETURN_IF_ERROR(Modify(a,
                                  IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT |
                                      IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC,
                                  "RTS"));
    state_ = QpState::kRts;
    return Status::Ok();
  }

  Status Post(std::span<const WorkRequest> requests) override {
    KVPOOL_RETURN_IF_ERROR(CheckPost(state_, posted_ - retired_, requests.size(), max_));
    if (requests.empty()) return Status::Ok();
    wrs_.assign(requests.size(), ibv_send_wr{});
    sges_.resize(requests.size());
    for (size_t i = 0; i < requests.size(); ++i) {
      const WorkRequest& r = requests[i];
      if (r.length > c_->port.max_msg_sz) {
        return Status(ErrorCode::kInvalidArgument,
                      "an RDMA transfer of " + std::to_string(r.length) +
                          " bytes exceeds the port's " + std::to_string(c_->port.max_msg_sz));
      }
      const uint64_t seq = posted_ + 1 + i;
      posted_ring_[seq % max_] = {r.wr_id, r.opcode, r.length};
      sges_[i] = {r.local_addr, static_cast<uint32_t>(r.length), r.lkey};
      ibv_send_wr& w = wrs_[i];
      w.wr_id = seq;
      w.next = i + 1 < requests.size() ? &wrs_[i + 1] : nullptr;
      w.sg_list = &sges_[i];
      w.num_sge = 1;
      w.opcode = r.opcode == Opcode::kRead ? IBV_WR_RDMA_READ : IBV_WR_RDMA_WRITE;
      w.send_flags = r.signaled ? IBV_SEND_SIGNALED : 0;
      w.wr.rdma.remote_addr = r.remote_addr;
      w.wr.rdma.rkey = r.rkey;
    }
    ibv_send_wr* bad = nullptr;
    const int rc = ibv_post_send(qp_, wrs_.data(), &bad);
    if (rc != 0) {
      // Requests before `bad` are on the wire (the caller quiesces the QP before it frees
      // their memory); this QP takes no more.
      state_ = QpState::kError;
      posted_ += static_cast<uint64_t>(bad != nullptr ? bad - wrs_.data() : 0);
      return Status(ErrorCode::kConnection, "ibv_post_send: " + Errno(rc));
    }
    posted_ += requests.size();
    return Status::Ok();
  }

  Result<size_t> Poll(std::span<Completion> out, net::Deadline deadline) override {
    const size_t want = std::min(out.size(), wcs_.size());
    for (uint64_t spins = 0;; ++spins) {
      const int n = ibv_poll_cq(cq_, static_cast<int>(want), wcs_.data());
      if (n < 0) {
        state_ = QpState::kError;
        return Status(ErrorCode::kConnection, "ibv_poll_cq failed");
      }
      if (n > 0) {
        for (int i = 0; i < n; ++i) {
          const ibv_wc& wc = wcs_[i];
          // An error completion carries only wr_id and status: the rest comes from the ring.
          const Posted& p = posted_ring_[wc.wr_id % max_];
          const WcStatus status = FromWc(wc.status);
          if (status != WcStatus::kSuccess) state_ = QpState::kError;
          out[i] = {p.wr_id, status, p.opcode, status == WcStatus::kSuccess ? p.length : 0};
          retired_ = std::max(retired_, wc.wr_id);  // a completion retires all before it
        }
        return static_cast<size_t>(n);
      }
      if (deadline.passed()) {
        return Status(
            ErrorCode::kTimeout,
            "no RDMA completion (" + std::to_string(posted_ - retired_) + " outstanding)");
      }
      // Busy-poll first (a completion is microseconds away), then give the core back.
      if (spins > 4096)
        std::this_thread::sleep_for(std::chrono::microseconds(spins > 65536 ? 50 : 0));
    }
  }

 private:
  struct Posted {
    uint64_t wr_id = 0;
    Opcode opcode = Opcode::kRead;
    uint64_t length = 0;
  };

  Status Modify(ibv_qp_attr& attr, int mask, const char* to) {
    const int rc = c_->lib->modify_qp(qp_, &attr, mask);
    if (rc == 0) return Status::Ok();
    state_ = QpState::kError;
    return Status(ErrorCode::kConnection, std::string("moving the QP to ") + to + " on " +
                                              c_->selection.device + ": " + Errno(rc));
  }

  std::shared_ptr<Context> c_;
  ibv_cq* cq_;
  ibv_qp* qp_;
  size_t max_;
  QpAddress address_;
  QpState state_ = QpState::kReset;
  uint64_t posted_ = 0, retired_ = 0;
  std::vector<Posted> posted_ring_;
  std::vector<ibv_send_wr> wrs_;
  std::vector<ibv_sge> sges_;
  std::vector<ibv_wc> wcs_;
};

class VerbsDevice final : public Device {
 public:
  explicit VerbsDevice(std::shared_ptr<Context> c)
      : c_(std::move(c)),
        description_(c_->selection.device + " port " + std::to_string(c_->selection.port) +
                     " GID " + std::to_string(c_->selection.gid_index) + " (" +
                     c_->selection.reason + ")") {}

  ~VerbsDevice() override {
    for (auto& [key, mr] : regions_) c_->lib->dereg_mr(mr);
  }

  const std::string& name() const override { return c_->selection.device; }
  const std::string& description() const override { return description_; }
  bool software() const override { return false; }

  Result<MemoryRegion> Register(void* addr, size_t length, uint32_t access) override {
    if (addr == nullptr || length == 0) {
      return Status(ErrorCode::kInvalidArgument, "cannot register an empty region");
    }
    int flags = 0;
    if (access & kLocalWrite) flags |= IBV_ACCESS_LOCAL_WRITE;
    if (access & kRemoteRead) flags |= IBV_ACCESS_REMOTE_READ;
    if (access & kRemoteWrite) flags |= IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE;
    // The iova is the address itself, so a peer names arena bytes by their virtual address;
    // relaxed ordering is a hint the device may ignore (it needs the iova2 entry point).
    ibv_mr* mr =
        c_->lib->reg_mr_iova2 != nullptr
            ? c_->lib->reg_mr_iova2(c_->pd, addr, length, reinterpret_cast<uint64_t>(addr),
                                    static_cast<unsigned>(flags) | IBV_ACCESS_RELAXED_ORDERING)
            : c_->lib->reg_mr(c_->pd, addr, length, flags);
    if (mr == nullptr) {
      const int err = errno;
      std::string hint;
      if (err == ENOMEM) {
        rlimit lim{};
        getrlimit(RLIMIT_MEMLOCK, &lim);
        hint = " (the locked-memory limit is " +
               (lim.rlim_cur == RLIM_INFINITY ? std::string("unlimited")
                                              : std::to_string(lim.rlim_cur) + " bytes") +
               ": raise `ulimit -l`, or LimitMEMLOCK= for a systemd unit)";
      }
      return Status(err == ENOMEM ? ErrorCode::kNoSpace : ErrorCode::kInternal,
                    "registering " + std::to_string(length) + " bytes with " + name() + ": " +
                        Errno(err) + hint);
    }
    std::lock_guard<std::mutex> lock(mu_);
    regions_[mr->lkey] = mr;
    return MemoryRegion{reinterpret_cast<uint64_t>(addr), length, mr->lkey, mr->rkey, access};
  }

  void Deregister(const MemoryRegion& region) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = regions_.find(region.lkey);
    if (it == regions_.end()) return;
    c_->lib->dereg_mr(it->second);
    regions_.erase(it);
  }

  Result<std::unique_ptr<QueuePair>> CreateQp(size_t max_outstanding) override {
    if (max_outstanding == 0) {
      return Status(ErrorCode::kInvalidArgument, "a QP needs room for at least one request");
    }
    max_outstanding = std::min<size_t>({max_outstanding, static_cast<size_t>(c_->device.max_qp_wr),
                                        static_cast<size_t>(c_->device.max_cqe)});
    ibv_cq* cq =
        c_->lib->create_cq(c_->ctx, static_cast<int>(max_outstanding), nullptr, nullptr, 0);
    if (cq == nullptr) {
      const int err = errno;
      return Status(ErrorCode::kConnection, "ibv_create_cq on " + name() + ": " + Errno(err));
    }
    ibv_qp_init_attr init{};
    init.send_cq = cq;
    init.recv_cq = cq;
    init.qp_type = IBV_QPT_RC;
    init.sq_sig_all = 0;  // selective signalling
    init.cap.max_send_wr = static_cast<uint32_t>(max_outstanding);
    init.cap.max_recv_wr = 1;
    init.cap.max_send_sge = 1;
    init.cap.max_recv_sge = 1;
    ibv_qp* qp = c_->lib->create_qp(c_->pd, &init);
    if (qp == nullptr) {
      const int err = errno;
      c_->lib->destroy_cq(cq);
      return Status(ErrorCode::kConnection, "ibv_create_qp on " + name() + ": " + Errno(err));
    }
    return std::unique_ptr<QueuePair>(new VerbsQp(c_, cq, qp, max_outstanding));
  }

 private:
  std::shared_ptr<Context> c_;
  std::string description_;
  std::mutex mu_;
  std::unordered_map<uint32_t, ibv_mr*> regions_;
};

}  // namespace
#endif

Result<std::unique_ptr<Device>> OpenVerbsDevice(const Selection& selection) {
#if KVPOOL_HAVE_IBVERBS
  const Library& lib = Load();
  if (lib.handle == nullptr) return Status(ErrorCode::kUnsupported, lib.error);
  int n = 0;
  ibv_device** list = lib.get_device_list(&n);
  if (list == nullptr) {
    const int err = errno;
    return Status(ErrorCode::kUnsupported, "RDMA device '" + selection.device +
                                               "' is in sysfs but libibverbs lists no device "
                                               "(ibv_get_device_list: " +
                                               Errno(err) + ")");
  }
  auto c = std::make_shared<Context>();
  c->lib = &lib;
  c->selection = selection;
  bool listed = false;
  int open_err = 0;
  for (int i = 0; i < n && c->ctx == nullptr; ++i) {
    const char* name = lib.get_device_name(list[i]);
    if (name == nullptr || selection.device != name) continue;
    listed = true;
    c->ctx = lib.open_device(list[i]);
    if (c->ctx == nullptr) open_err = errno;
  }
  lib.free_device_list(list);
  if (c->ctx == nullptr) {
    return Status(ErrorCode::kUnsupported,
                  "libibverbs cannot open RDMA device '" + selection.device + "': " +
                      (listed ? Errno(open_err)
                              : "not among the " + std::to_string(n) + " devices it lists"));
  }
  const std::string where = selection.device + " port " + std::to_string(selection.port);
  if (int rc = lib.query_device(c->ctx, &c->device); rc != 0) {
    return Status(ErrorCode::kUnsupported, "ibv_query_device on " + where + ": " + Errno(rc));
  }
  if (int rc = QueryPort(lib, c->ctx, static_cast<uint8_t>(selection.port), &c->port); rc != 0) {
    return Status(ErrorCode::kInvalidArgument, "ibv_query_port on " + where + ": " + Errno(rc));
  }
  if (c->port.state != IBV_PORT_ACTIVE) {
    return Status(ErrorCode::kUnsupported, where + " is not ACTIVE");
  }
  if (lib.query_gid(c->ctx, static_cast<uint8_t>(selection.port), selection.gid_index, &c->gid) !=
      0) {
    const int err = errno;  // ibv_query_gid returns -1 and sets errno
    return Status(ErrorCode::kInvalidArgument, "ibv_query_gid " +
                                                   std::to_string(selection.gid_index) + " on " +
                                                   where + ": " + Errno(err));
  }
  c->pd = lib.alloc_pd(c->ctx);
  if (c->pd == nullptr) {
    const int err = errno;
    return Status(ErrorCode::kUnsupported, "ibv_alloc_pd on " + where + ": " + Errno(err));
  }
  return std::unique_ptr<Device>(new VerbsDevice(std::move(c)));
#else
  return Status(ErrorCode::kUnsupported,
                "kvpool was built without the rdma-core headers (apt-get install libibverbs-dev, "
                "then rebuild); RDMA device '" +
                    selection.device + "' cannot be used");
#endif
}

VerbsProbe ProbeVerbs() {
  VerbsProbe probe;
#if KVPOOL_HAVE_IBVERBS
  probe.built = true;
  const Library& lib = Load();
  if (lib.handle == nullptr) {
    probe.reason = lib.error;
    return probe;
  }
  probe.library = true;
  int n = 0;
  ibv_device** list = lib.get_device_list(&n);
  if (list == nullptr) {
    // ENOSYS: the kernel has no RDMA support (no uverbs) — the same answer as an empty list.
    probe.reason = std::string("no RDMA devices on this machine (ibv_get_device_list: ") +
                   std::strerror(errno) + ")";
    return probe;
  }
  std::string unopened;
  for (int i = 0; i < n; ++i) {
    const char* name = lib.get_device_name(list[i]);
    ibv_context* ctx = lib.open_device(list[i]);
    if (ctx == nullptr) {
      unopened += std::string(unopened.empty() ? "" : ", ") + (name ? name : "?") + " (" +
                  std::strerror(errno) + ")";
      continue;
    }
    lib.close_device(ctx);
    probe.devices.emplace_back(name != nullptr ? name : "");
  }
  lib.free_device_list(list);
  if (probe.devices.empty()) {
    probe.reason = unopened.empty() ? "no RDMA devices on this machine"
                                    : "no RDMA device could be opened: " + unopened;
  }
#else
  probe.reason =
      "kvpool was built without the rdma-core headers (apt-get install libibverbs-dev, "
      "then rebuild)";
#endif
  return probe;
}

}  // namespace kvpool::rdma
