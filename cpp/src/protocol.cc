#include "kvpool/protocol.h"

#include <cstdio>
#include <string>

namespace kvpool::protocol {

bool IsKnownOp(uint8_t op) {
  return op >= static_cast<uint8_t>(Op::kHello) && op <= static_cast<uint8_t>(Op::kAuth);
}

const char* OpName(uint8_t op) {
  static constexpr const char* kNames[] = {"unknown",      "hello",  "put",   "get", "exists",
                                           "match_prefix", "delete", "stats", "auth"};
  return IsKnownOp(op) ? kNames[op] : kNames[0];
}

void AppendExt(std::string& out, Ext type, std::string_view value) {
  uint8_t head[kExtHeaderBytes] = {};
  const auto t = static_cast<uint16_t>(type);
  const auto len = static_cast<uint32_t>(value.size());
  std::memcpy(head, &t, 2);
  std::memcpy(head + 4, &len, 4);
  out.append(reinterpret_cast<const char*>(head), sizeof head);
  out.append(value);
}

Status ValidateRequestHeader(const Header& h, const Limits& limits, uint32_t version) {
  if (h.magic != kMagic) {
    return Status(
        ErrorCode::kBadMagic, "bad frame magic 0x" + [&] {
          char buf[9];
          std::snprintf(buf, sizeof buf, "%08x", h.magic);
          return std::string(buf);
        }());
  }
  const auto op = static_cast<uint8_t>(h.op);
  if (!IsKnownOp(op)) return Status(ErrorCode::kUnknownOp, "unknown opcode " + std::to_string(op));
  if (h.op == Op::kAuth && version < 2) {
    return Status(ErrorCode::kUnknownOp,
                  "unknown opcode 8 (AUTH needs protocol version 2, the "
                  "connection speaks " +
                      std::to_string(version) + ")");
  }
  const bool described = h.flags == kFlagDescribed && (h.op == Op::kPut || h.op == Op::kGet);
  if ((h.flags != 0 && !described) || h.reserved != 0 || h.status != 0) {
    return Status(ErrorCode::kBadFrame, "request has flags " + std::to_string(h.flags) +
                                            ", reserved " + std::to_string(h.reserved) +
                                            ", status " + std::to_string(h.status) +
                                            " (flags may be 0, or 2 on a v2 PUT or GET)");
  }
  if (described && version < 2) {
    return Status(ErrorCode::kBadFrame, "the described flag needs protocol version 2, the " +
                                            std::string("connection speaks ") +
                                            std::to_string(version));
  }
  if (h.body_bytes > limits.max_frame_bytes) {
    return Status(ErrorCode::kFrameTooLarge, "frame body of " + std::to_string(h.body_bytes) +
                                                 " bytes exceeds max_frame_bytes " +
                                                 std::to_string(limits.max_frame_bytes));
  }
  if (h.count > limits.max_batch_keys) {
    return Status(ErrorCode::kBatchTooLarge, "batch of " + std::to_string(h.count) +
                                                 " keys exceeds max_batch_keys " +
                                                 std::to_string(limits.max_batch_keys));
  }
  uint64_t expected = 0;
  switch (h.op) {
    case Op::kHello:
      if (h.count != 0)
        return Status(ErrorCode::kBadFrame,
                      "HELLO count must be 0, got " + std::to_string(h.count));
      // v1 nodes took exactly 8 bytes; v2 allows extensions after them (the node's reply to
      // a client whose range stops at 1 is the v1 reply).
      if (h.body_bytes < kHelloRequestBytes ||
          h.body_bytes > (limits.version >= 2 ? kMaxHelloBytes : kHelloRequestBytes)) {
        return Status(ErrorCode::kBadFrame,
                      "HELLO body must be " + std::to_string(kHelloRequestBytes) +
                          (limits.version >= 2 ? " to " + std::to_string(kMaxHelloBytes) : "") +
                          " bytes, got " + std::to_string(h.body_bytes));
      }
      return Status::Ok();
    case Op::kPut:
      // The exact size is known only once the length table is read; it must at least hold it.
      if (h.body_bytes <
          uint64_t{h.count} * (described ? kDescribedPutEntryBytes : kPutEntryBytes)) {
        return Status(ErrorCode::kBadFrame, "PUT body of " + std::to_string(h.body_bytes) +
                                                " bytes cannot hold " + std::to_string(h.count) +
                                                " table entries");
      }
      return Status::Ok();
    case Op::kStats:
      if (h.count != 0)
        return Status(ErrorCode::kBadFrame,
                      "STATS count must be 0, got " + std::to_string(h.count));
      expected = 0;
      break;
    case Op::kAuth:
      if (h.count != 0)
        return Status(ErrorCode::kBadFrame, "AUTH count must be 0, got " + std::to_string(h.count));
      expected = kAuthProofBytes;
      break;
    case Op::kGet:
      expected = uint64_t{h.count} * (described ? kDescribedGetEntryBytes : kKeyBytes);
      break;
    default:
      expected = uint64_t{h.count} * kKeyBytes;
      break;
  }
  if (h.body_bytes != expected) {
    return Status(ErrorCode::kBadFrame, "body of " + std::to_string(h.body_bytes) + " bytes for " +
                                            std::to_string(h.count) + " keys, expected " +
                                            std::to_string(expected));
  }
  return Status::Ok();
}

void EncodeLimits(const Limits& l, uint8_t* out) {
  std::memcpy(out, &l.version, 4);
  std::memcpy(out + 4, &l.max_batch_keys, 4);
  std::memcpy(out + 8, &l.max_frame_bytes, 8);
  std::memcpy(out + 16, &l.max_block_bytes, 8);
}

Limits DecodeLimits(const uint8_t* in) {
  Limits l;
  std::memcpy(&l.version, in, 4);
  std::memcpy(&l.max_batch_keys, in + 4, 4);
  std::memcpy(&l.max_frame_bytes, in + 8, 8);
  std::memcpy(&l.max_block_bytes, in + 16, 8);
  return l;
}

}  // namespace kvpool::protocol
