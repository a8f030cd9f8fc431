// Shared memory (same host): the client's staging arena is a sealed memfd that it passes over the
// node's unix-domain socket at HELLO (SCM_RIGHTS); the node maps it for the connection's lifetime
// and moves payloads with one memcpy each way. The pool itself is never shared.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kvpool/transport.h"

namespace kvpool {

class ShmLink final : public Link {
 public:
  /// Maps the client's arena. The memfd must be sealed against shrinking (so no later truncation
  /// can make a copy fault), live on tmpfs, and hold at least `bytes`; InvalidArgument naming
  /// what is wrong otherwise. Takes ownership of nothing: the caller closes `memfd`.
  static Result<std::unique_ptr<ShmLink>> Open(int fd, int memfd, uint64_t bytes);
  ~ShmLink() override;

  TransportKind kind() const override { return TransportKind::kShm; }
  Status CheckRuns(std::span<const PeerBuffer> runs) override;
  uint64_t arena_bytes() const { return bytes_; }

 protected:
  Status ReadPeer(std::span<const PeerBuffer> from, std::span<const MutableBuffer> into) override;
  Status WritePeer(std::span<const ConstBuffer> blocks, std::span<const PeerBuffer> to) override;

 private:
  ShmLink(int fd, uint8_t* base, uint64_t bytes) : Link(fd), base_(base), bytes_(bytes) {}
  uint8_t* base_;
  uint64_t bytes_;
  std::vector<PeerBuffer> sorted_;
};

}  // namespace kvpool
