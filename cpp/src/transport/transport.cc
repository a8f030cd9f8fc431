#include "kvpool/transport.h"

#include <poll.h>

#include <algorithm>

#include "support/socket.h"

namespace kvpool {
namespace {
constexpr size_t kScratchBytes = 256 << 10;
}  // namespace

const char* TransportKindName(TransportKind kind) {
  switch (kind) {
    case TransportKind::kTcp:
      return "tcp";
    case TransportKind::kShm:
      return "shm";
    case TransportKind::kRdma:
      return "rdma";
  }
  return "unknown";
}

Result<TransportKind> ParseTransportKind(std::string_view name) {
  for (auto kind : {TransportKind::kTcp, TransportKind::kShm, TransportKind::kRdma}) {
    if (name == TransportKindName(kind)) return kind;
  }
  return Status(ErrorCode::kInvalidArgument,
                "transport must be 'tcp', 'shm' or 'rdma', got '" + std::string(name) + "'");
}

Status Link::CheckRuns(std::span<const PeerBuffer> runs) {
  for (size_t i = 0; i < runs.size(); ++i) {
    if (runs[i].described()) {
      return Status(ErrorCode::kBadFrame,
                    "entry " + std::to_string(i) + " names peer memory, but this " +
                        TransportKindName(kind()) + " connection registered none");
    }
  }
  return Status::Ok();
}

Status CheckRunsInRegion(std::span<const PeerBuffer> runs, uint64_t region_bytes,
                         std::vector<PeerBuffer>& sorted) {
  sorted.clear();
  for (size_t i = 0; i < runs.size(); ++i) {
    const PeerBuffer& r = runs[i];
    if (!r.described()) continue;
    if (r.addr > region_bytes || r.size > region_bytes - r.addr) {
      return Status(ErrorCode::kBadFrame, "entry " + std::to_string(i) + " names bytes [" +
                                              std::to_string(r.addr) + ", +" +
                                              std::to_string(r.size) + ") outside the " +
                                              std::to_string(region_bytes) + "-byte arena");
    }
    if (r.size > 0) sorted.push_back(r);
  }
  std::sort(sorted.begin(), sorted.end(),
            [](const PeerBuffer& a, const PeerBuffer& b) { return a.addr < b.addr; });
  for (size_t i = 1; i < sorted.size(); ++i) {
    if (sorted[i].addr < sorted[i - 1].addr + sorted[i - 1].size) {
      return Status(ErrorCode::kBadFrame, "arena runs at " + std::to_string(sorted[i - 1].addr) +
                                              " (+" + std::to_string(sorted[i - 1].size) +
                                              ") and " + std::to_string(sorted[i].addr) +
                                              " overlap");
    }
  }
  return Status::Ok();
}

Status Link::ReadPeer(std::span<const PeerBuffer>, std::span<const MutableBuffer>) {
  return Status(ErrorCode::kInternal, "ReadPeer on a link without peer memory");
}

Status Link::WritePeer(std::span<const ConstBuffer>, std::span<const PeerBuffer>) {
  return Status(ErrorCode::kInternal, "WritePeer on a link without peer memory");
}

Status Link::PeerStillConnected() const {
  pollfd p{fd_, POLLRDHUP, 0};
  if (poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0) {
    return Status(ErrorCode::kClosed,
                  "the client closed the connection while the node copied its memory");
  }
  return Status::Ok();
}

Status Link::Pull(std::span<const PeerBuffer> from, std::span<const MutableBuffer> into,
                  net::Deadline deadline) {
  bool any_described = false;
  for (const PeerBuffer& p : from) any_described = any_described || p.described();
  if (any_described) KVPOOL_RETURN_IF_ERROR(ReadPeer(from, into));
  for (size_t i = 0; i < from.size(); ++i) {
    if (from[i].described()) continue;
    if (into[i].data != nullptr) {
      KVPOOL_RETURN_IF_ERROR(net::RecvAll(fd_, into[i].data, into[i].size, deadline));
    } else if (into[i].size > 0) {
      if (scratch_.empty()) scratch_.resize(kScratchBytes);
      KVPOOL_RETURN_IF_ERROR(
          net::Discard(fd_, into[i].size, scratch_.data(), scratch_.size(), deadline));
    }
  }
  // A client closes a connection before a failed call returns, and only then may it reuse the
  // memory: a frame whose client is still connected after the copy was copied from memory it
  // had not reused, so only that frame may be committed.
  if (any_described) KVPOOL_RETURN_IF_ERROR(PeerStillConnected());
  return Status::Ok();
}

Status Link::Push(std::span<const iovec> head, std::span<const ConstBuffer> blocks,
                  std::span<const PeerBuffer> to, net::Deadline deadline) {
  iov_.assign(head.begin(), head.end());
  bool any_described = false;
  for (size_t i = 0; i < blocks.size(); ++i) {
    if (blocks[i].data == nullptr) continue;
    if (i < to.size() && DeliveredInPeer(to[i], blocks[i].size)) {
      any_described = true;
      continue;
    }
    iov_.push_back({const_cast<uint8_t*>(blocks[i].data), blocks[i].size});
  }
  // The peer's memory is complete before the reply that announces it is sent. A client that
  // gave up on this frame has closed the connection: then its memory is left alone.
  if (any_described) {
    KVPOOL_RETURN_IF_ERROR(PeerStillConnected());
    KVPOOL_RETURN_IF_ERROR(WritePeer(blocks, to));
  }
  return net::SendAll(fd_, iov_.data(), iov_.size(), deadline);
}

}  // namespace kvpool
