// TCP: every payload rides inline in the frames (the base Link's stream path, nothing else).
#pragma once

#include <memory>

#include "kvpool/transport.h"

namespace kvpool {

class TcpLink final : public Link {
 public:
  explicit TcpLink(int fd) : Link(fd) {}
  TransportKind kind() const override { return TransportKind::kTcp; }
};

}  // namespace kvpool
