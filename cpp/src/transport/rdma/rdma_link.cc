#include "transport/rdma/rdma_link.h"

#include <algorithm>

namespace kvpool {

Status RdmaLink::Run(std::vector<rdma::WorkRequest>& wrs) {
  Status s = PostAndWait(wrs);
  // The caller aborts reservations and drops pins next: no transfer may still be in flight.
  if (!s.ok()) qp_->Quiesce();
  return s;
}

Status RdmaLink::PostAndWait(std::vector<rdma::WorkRequest>& wrs) {
  const size_t window = std::max<size_t>(1, qp_->max_outstanding());
  completions_.resize(window);
  for (size_t begin = 0; begin < wrs.size(); begin += window) {
    const size_t end = std::min(wrs.size(), begin + window);
    // Selective signalling: one completion per window; an error is reported regardless.
    for (size_t i = begin; i < end; ++i) wrs[i].signaled = i + 1 == end;
    KVPOOL_RETURN_IF_ERROR(qp_->Post(std::span(wrs).subspan(begin, end - begin)));
    const auto deadline = net::Deadline::In(timeout_);
    bool done = false;
    while (!done) {
      auto n = qp_->Poll(completions_, deadline);
      if (!n.ok()) return n.status();
      for (size_t i = 0; i < n.value(); ++i) {
        const rdma::Completion& c = completions_[i];
        if (c.status != rdma::WcStatus::kSuccess) {
          return Status(ErrorCode::kConnection,
                        std::string("RDMA ") +
                            (c.opcode == rdma::Opcode::kRead ? "READ" : "WRITE") + " of request " +
                            std::to_string(c.wr_id) + " failed: " + rdma::WcStatusName(c.status));
        }
        done = done || c.wr_id == wrs[end - 1].wr_id;
      }
    }
  }
  return Status::Ok();
}

void RdmaLink::Add(rdma::Opcode opcode, size_t index, const void* pool_bytes, uint64_t length,
                   uint64_t arena_offset) {
  rdma::WorkRequest wr;
  wr.wr_id = index;
  wr.opcode = opcode;
  wr.local_addr = reinterpret_cast<uint64_t>(pool_bytes);
  wr.lkey = pool_.lkey;
  wr.length = length;
  wr.remote_addr = arena_.addr + arena_offset;
  wr.rkey = arena_.rkey;
  wrs_.push_back(wr);
}

Status RdmaLink::ReadPeer(std::span<const PeerBuffer> from, std::span<const MutableBuffer> into) {
  wrs_.clear();
  for (size_t i = 0; i < from.size(); ++i) {
    if (!from[i].described() || into[i].data == nullptr || from[i].size == 0) continue;
    Add(rdma::Opcode::kRead, i, into[i].data, from[i].size, from[i].addr);
  }
  return Run(wrs_);
}

Status RdmaLink::WritePeer(std::span<const ConstBuffer> blocks, std::span<const PeerBuffer> to) {
  wrs_.clear();
  for (size_t i = 0; i < blocks.size(); ++i) {
    if (blocks[i].data == nullptr || i >= to.size() || !DeliveredInPeer(to[i], blocks[i].size) ||
        blocks[i].size == 0) {
      continue;
    }
    Add(rdma::Opcode::kWrite, i, blocks[i].data, blocks[i].size, to[i].addr);
  }
  return Run(wrs_);
}

}  // namespace kvpool
