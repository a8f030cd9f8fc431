// RDMA: the node posts READs (PUT) and WRITEs (GET) between its pool (a local-only region) and
// the client's registered arena, and answers on the control connection only after every
// completion arrived. A failed or flushed request fails the frame: its reservations are aborted
// and its pins dropped by the request handler, as for any other transport error.
#pragma once

#include <chrono>
#include <memory>
#include <vector>

#include "kvpool/transport.h"
#include "transport/rdma/verbs.h"

namespace kvpool {

class RdmaLink final : public Link {
 public:
  /// `pool` is the node's pool region; `arena` the client's, as its offer described it;
  /// `timeout` bounds the wait for one window's completions (the node's io_timeout).
  RdmaLink(int fd, std::unique_ptr<rdma::QueuePair> qp, const rdma::MemoryRegion& pool,
           const rdma::MemoryRegion& arena, std::chrono::milliseconds timeout)
      : Link(fd), qp_(std::move(qp)), pool_(pool), arena_(arena), timeout_(timeout) {}

  TransportKind kind() const override { return TransportKind::kRdma; }
  Status CheckRuns(std::span<const PeerBuffer> runs) override {
    return CheckRunsInRegion(runs, arena_.length, sorted_);
  }

 protected:
  Status ReadPeer(std::span<const PeerBuffer> from, std::span<const MutableBuffer> into) override;
  Status WritePeer(std::span<const ConstBuffer> blocks, std::span<const PeerBuffer> to) override;

 private:
  /// Posts `wrs` in windows of the QP's bound, signalling the last of each window, and waits
  /// for every completion. The first error fails the whole batch, and only once the device has
  /// stopped touching the batch's memory (QueuePair::Quiesce).
  Status Run(std::vector<rdma::WorkRequest>& wrs);
  Status PostAndWait(std::vector<rdma::WorkRequest>& wrs);
  /// Queues one transfer between pool bytes and the arena run at `arena_offset`.
  void Add(rdma::Opcode opcode, size_t index, const void* pool_bytes, uint64_t length,
           uint64_t arena_offset);

  std::unique_ptr<rdma::QueuePair> qp_;
  rdma::MemoryRegion pool_, arena_;
  std::chrono::milliseconds timeout_;
  std::vector<PeerBuffer> sorted_;
  std::vector<rdma::WorkRequest> wrs_;
  std::vector<rdma::Completion> completions_;
};

}  // namespace kvpool
