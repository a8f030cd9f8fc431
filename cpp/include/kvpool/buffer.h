// Byte spans the data path moves: caller memory on a client, pool memory on a node.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvpool {

struct ConstBuffer {
  const uint8_t* data;
  size_t size;
};
struct MutableBuffer {
  uint8_t* data;
  size_t size;
};

}  // namespace kvpool
