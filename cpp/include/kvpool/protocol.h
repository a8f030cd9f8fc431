// The binary wire protocol between clients and storage nodes (docs/protocol.md is the spec).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>

#include "kvpool/status.h"

namespace kvpool::protocol {

/// "KVP1" read as a little-endian u32.
inline constexpr uint32_t kMagic = 0x3150564B;
inline constexpr uint32_t kVersion = 2;  ///< The newest version spoken; 1 is still accepted.
inline constexpr uint32_t kMinVersion = 1;
inline constexpr size_t kHeaderBytes = 32;
inline constexpr size_t kKeyBytes = 16;
inline constexpr size_t kPutEntryBytes = kKeyBytes + 8;  ///< key + u64 length
inline constexpr uint64_t kMissing = ~uint64_t{0};       ///< GET reply length of an absent key
inline constexpr uint8_t kFlagError = 1;                 ///< reply flag: body is an error message
/// v2 request flag on PUT and GET: entries name runs of the client's staging arena (PeerBuffer)
/// that the node copies from or into, instead of carrying the payloads inline.
inline constexpr uint8_t kFlagDescribed = 2;
inline constexpr size_t kDescribedPutEntryBytes = kKeyBytes + 16;  ///< key, u64 length, u64 addr
inline constexpr size_t kDescribedGetEntryBytes = kKeyBytes + 16;  ///< key, u64 addr, u64 capacity
/// A described entry whose payload travels inline on the stream after all.
inline constexpr uint64_t kInline = ~uint64_t{0};

enum class Op : uint8_t {
  kHello = 1,
  kPut = 2,
  kGet = 3,
  kExists = 4,
  kMatchPrefix = 5,
  kDelete = 6,
  kStats = 7,
  kAuth = 8,  ///< v2: the client's proof of the auth token (32 bytes); the reply is the node's
};
inline constexpr size_t kAuthProofBytes = 32;

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
/// v2: HELLO bodies may carry extensions after the fixed part, up to this many bytes in all.
inline constexpr size_t kMaxHelloBytes = 8 + 4096;

/// v2 HELLO extensions: type-length-value entries (u16 type, u16 zero, u32 length, bytes) after
/// the fixed part of a HELLO request or reply. Unknown types are skipped by both sides.
enum class Ext : uint16_t {
  kAuth = 1,         ///< u8 method (1: HMAC-SHA256), 16-byte nonce: request and reply
  kTransport = 2,    ///< request: u8 kind + the kind's offer; reply: u8 kind in use
  kShmEndpoint = 3,  ///< reply on TCP: u16 host-id length, host id, socket path (the rest)
  kNodeId = 4,       ///< reply: 16 bytes that identify this node process
  kTransports = 5,   ///< reply on TCP: u8 kinds the node serves (beyond tcp), one byte each
};
inline constexpr size_t kExtHeaderBytes = 8;

/// Appends one extension to `out`.
void AppendExt(std::string& out, Ext type, std::string_view value);
/// Calls on_ext(type, value) for each extension in `bytes`; BadFrame when one overruns.
template <typename OnExt>
Status ForEachExt(std::span<const uint8_t> bytes, OnExt on_ext) {
  size_t at = 0;
  while (at < bytes.size()) {
    if (bytes.size() - at < kExtHeaderBytes) {
      return Status(ErrorCode::kBadFrame,
                    "HELLO extension header truncated at byte " + std::to_string(at));
    }
    uint16_t type, zero;
    uint32_t len;
    std::memcpy(&type, bytes.data() + at, 2);
    std::memcpy(&zero, bytes.data() + at + 2, 2);
    std::memcpy(&len, bytes.data() + at + 4, 4);
    at += kExtHeaderBytes;
    if (zero != 0) {
      return Status(ErrorCode::kBadFrame, "HELLO extension of type " + std::to_string(type) +
                                              " has " + std::to_string(zero) +
                                              " in its reserved field (must be 0)");
    }
    if (len > bytes.size() - at) {
      return Status(ErrorCode::kBadFrame, "HELLO extension of type " + std::to_string(type) +
                                              " claims " + std::to_string(len) + " bytes, " +
                                              std::to_string(bytes.size() - at) + " remain");
    }
    KVPOOL_RETURN_IF_ERROR(
        on_ext(type, std::string_view(reinterpret_cast<const char*>(bytes.data() + at), len)));
    at += len;
  }
  return Status::Ok();
}

inline void EncodeHeader(const Header& h, uint8_t* out) { std::memcpy(out, &h, kHeaderBytes); }
inline Header DecodeHeader(const uint8_t* in) {
  Header h;
  std::memcpy(&h, in, kHeaderBytes);
  return h;
}

bool IsKnownOp(uint8_t op);
/// The op's lower-case name ("put", "match_prefix", ...); "unknown" for any other byte.
const char* OpName(uint8_t op);

/// Checks a request header against the node's limits before any of its body is read:
/// BadMagic, UnknownOp, BadFrame (reserved bits set, or a body size the op forbids),
/// FrameTooLarge, BatchTooLarge. The message names the offending value. `version` is the one
/// negotiated on the connection (0 before HELLO): v1 HELLO bodies are exactly 8 bytes, and the
/// described flag exists from v2 on.
Status ValidateRequestHeader(const Header& h, const Limits& limits, uint32_t version);

void EncodeLimits(const Limits& limits, uint8_t* out);
Limits DecodeLimits(const uint8_t* in);

}  // namespace kvpool::protocol
