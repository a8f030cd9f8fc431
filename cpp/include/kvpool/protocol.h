// The binary wire protocol between clients and storage nodes (docs/protocol.md is the spec).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kvpool/status.h"

namespace kvpool::protocol {

/// "KVP1" read as a little-endian u32.
inline constexpr uint32_t kMagic = 0x3150564B;
inline constexpr uint32_t kVersion = 1;
inline constexpr size_t kHeaderBytes = 32;
inline constexpr size_t kKeyBytes = 16;
inline constexpr size_t kPutEntryBytes = kKeyBytes + 8;  ///< key + u64 length
inline constexpr uint64_t kMissing = ~uint64_t{0};       ///< GET reply length of an absent key
inline constexpr uint8_t kFlagError = 1;                 ///< reply flag: body is an error message

enum class Op : uint8_t {
  kHello = 1,
  kPut = 2,
  kGet = 3,
  kExists = 4,
  kMatchPrefix = 5,
  kDelete = 6,
  kStats = 7,
};

/// Per-block outcome of a PUT, one byte each in the reply.
enum class PutStatus : uint8_t { kStored = 0, kExists = 1, kNoSpace = 2, kTooLarge = 3 };

/// Every frame, request or reply, starts with this header (all fields little-endian).
struct Header {
  uint32_t magic = kMagic;
  Op op = Op::kHello;
  uint8_t flags = 0;
  uint16_t reserved = 0;
  uint64_t request_id = 0;
  uint32_t count = 0;  ///< keys in the batch; MATCH_PREFIX replies carry the match length here
  int32_t status = 0;  ///< replies: ErrorCode
  uint64_t body_bytes = 0;
};
static_assert(sizeof(Header) == kHeaderBytes, "Header must match the wire layout");

/// Limits a node announces in its HELLO reply; clients split batches to fit them.
struct Limits {
  uint32_t version = kVersion;
  uint32_t max_batch_keys = 4096;
  uint64_t max_frame_bytes = uint64_t{1} << 30;
  uint64_t max_block_bytes = uint64_t{256} << 20;
};
inline constexpr size_t kHelloRequestBytes = 8;  ///< u32 min_version, u32 max_version
inline constexpr size_t kHelloReplyBytes = 24;   ///< Limits, packed

inline void EncodeHeader(const Header& h, uint8_t* out) { std::memcpy(out, &h, kHeaderBytes); }
inline Header DecodeHeader(const uint8_t* in) {
  Header h;
  std::memcpy(&h, in, kHeaderBytes);
  return h;
}

bool IsKnownOp(uint8_t op);

/// Checks a request header against the node's limits before any of its body is read:
/// BadMagic, UnknownOp, BadFrame (reserved bits set, or a body size the op forbids),
/// FrameTooLarge, BatchTooLarge. The message names the offending value.
Status ValidateRequestHeader(const Header& h, const Limits& limits);

void EncodeLimits(const Limits& limits, uint8_t* out);
Limits DecodeLimits(const uint8_t* in);

}  // namespace kvpool::protocol
