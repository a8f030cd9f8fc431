// Wire format and request-header validation (docs/protocol.md).
#include "kvpool/protocol.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <vector>

namespace kvpool::protocol {
namespace {

Header Request(Op op, uint32_t count, uint64_t body_bytes) {
  Header h;
  h.op = op;
  h.request_id = 42;
  h.count = count;
  h.body_bytes = body_bytes;
  return h;
}

Header RawOp(uint8_t op) {
  Header h = Request(Op::kStats, 0, 0);
  std::memcpy(&h.op, &op, 1);
  return h;
}

ErrorCode CodeOf(const Header& h, const Limits& limits = Limits{}) {
  return ValidateRequestHeader(h, limits, 2).code();
}

const Op kKeyOps[] = {Op::kGet, Op::kExists, Op::kMatchPrefix, Op::kDelete};

TEST(Protocol, HeaderWireLayout) {
  Header h;
  h.op = Op::kGet;
  h.flags = 0x5a;
  h.reserved = 0x0102;
  h.request_id = 0x1122334455667788ull;
  h.count = 0xa1b2c3d4u;
  h.status = -2;
  h.body_bytes = 0x0807060504030201ull;
  uint8_t raw[kHeaderBytes];
  EncodeHeader(h, raw);
  const std::vector<uint8_t> expected = {
      'K',  'V',  'P',  '1',  3,    0x5a, 0x02, 0x01,  // magic, op, flags, reserved
      0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11,  // request_id
      0xd4, 0xc3, 0xb2, 0xa1, 0xfe, 0xff, 0xff, 0xff,  // count, status
      0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,  // body_bytes
  };
  EXPECT_EQ(std::vector<uint8_t>(raw, raw + kHeaderBytes), expected);
  const Header back = DecodeHeader(raw);
  EXPECT_EQ(back.magic, kMagic);
  EXPECT_EQ(back.op, Op::kGet);
  EXPECT_EQ(back.flags, 0x5a);
  EXPECT_EQ(back.reserved, 0x0102);
  EXPECT_EQ(back.request_id, h.request_id);
  EXPECT_EQ(back.count, h.count);
  EXPECT_EQ(back.status, -2);
  EXPECT_EQ(back.body_bytes, h.body_bytes);
}

TEST(Protocol, KnownOps) {
  for (int op = 0; op < 256; ++op) {
    EXPECT_EQ(IsKnownOp(static_cast<uint8_t>(op)), op >= 1 && op <= 8) << op;
  }
}

TEST(Protocol, WellFormedRequestsPass) {
  const Limits limits;
  EXPECT_TRUE(ValidateRequestHeader(Request(Op::kHello, 0, kHelloRequestBytes), limits, 2).ok());
  EXPECT_TRUE(ValidateRequestHeader(Request(Op::kStats, 0, 0), limits, 2).ok());
  for (Op op : kKeyOps) {
    for (uint32_t count : {0u, 1u, 7u, limits.max_batch_keys}) {
      const Status s =
          ValidateRequestHeader(Request(op, count, uint64_t{count} * kKeyBytes), limits, 2);
      EXPECT_TRUE(s.ok()) << static_cast<int>(op) << " count " << count << ": " << s.ToString();
    }
  }
  // PUT: the table plus any payload up to the frame limit.
  EXPECT_TRUE(ValidateRequestHeader(Request(Op::kPut, 0, 0), limits, 2).ok());
  EXPECT_TRUE(ValidateRequestHeader(Request(Op::kPut, 1, kPutEntryBytes), limits, 2).ok());
  EXPECT_TRUE(
      ValidateRequestHeader(Request(Op::kPut, 3, 3 * kPutEntryBytes + 4096), limits, 2).ok());
  EXPECT_TRUE(ValidateRequestHeader(
                  Request(Op::kPut, limits.max_batch_keys, limits.max_frame_bytes), limits, 2)
                  .ok());
}

TEST(Protocol, BadMagic) {
  for (uint32_t magic : {0u, 0x3150564Cu, 0x4B565031u /* big-endian "KVP1" */, 0xffffffffu}) {
    Header h = Request(Op::kStats, 0, 0);
    h.magic = magic;
    const Status s = ValidateRequestHeader(h, Limits{}, 2);
    EXPECT_EQ(s.code(), ErrorCode::kBadMagic) << magic;
    EXPECT_FALSE(s.message().empty());
  }
}

TEST(Protocol, UnknownOp) {
  for (int op : {0, 9, 10, 100, 255}) {
    const Status s = ValidateRequestHeader(RawOp(static_cast<uint8_t>(op)), Limits{}, 2);
    EXPECT_EQ(s.code(), ErrorCode::kUnknownOp) << op;
    EXPECT_NE(s.message().find(std::to_string(op)), std::string::npos) << s.message();
  }
}

TEST(Protocol, NonZeroFlagsReservedOrStatus) {
  for (Op op : {Op::kHello, Op::kPut, Op::kGet, Op::kStats}) {
    Header h = Request(op, 0, op == Op::kHello ? kHelloRequestBytes : 0);
    ASSERT_TRUE(ValidateRequestHeader(h, Limits{}, 2).ok());
    Header f = h;
    f.flags = kFlagError;
    EXPECT_EQ(CodeOf(f), ErrorCode::kBadFrame);
    f.flags = 0x80;
    EXPECT_EQ(CodeOf(f), ErrorCode::kBadFrame);
    Header r = h;
    r.reserved = 1;
    EXPECT_EQ(CodeOf(r), ErrorCode::kBadFrame);
    r.reserved = 0x8000;
    EXPECT_EQ(CodeOf(r), ErrorCode::kBadFrame);
    Header st = h;
    st.status = 200;
    EXPECT_EQ(CodeOf(st), ErrorCode::kBadFrame);
    st.status = -1;
    EXPECT_EQ(CodeOf(st), ErrorCode::kBadFrame);
  }
}

TEST(Protocol, BodyTooLarge) {
  Limits limits;
  limits.max_frame_bytes = 1 << 20;
  const Status s = ValidateRequestHeader(Request(Op::kPut, 1, (1 << 20) + 1), limits, 2);
  EXPECT_EQ(s.code(), ErrorCode::kFrameTooLarge);
  EXPECT_NE(s.message().find(std::to_string((1 << 20) + 1)), std::string::npos) << s.message();
  for (Op op : {Op::kHello, Op::kGet, Op::kStats, Op::kDelete}) {
    EXPECT_EQ(CodeOf(Request(op, 0, ~uint64_t{0}), limits), ErrorCode::kFrameTooLarge);
  }
  // Exactly the limit is allowed.
  EXPECT_TRUE(ValidateRequestHeader(Request(Op::kPut, 1, 1 << 20), limits, 2).ok());
}

TEST(Protocol, BatchTooLarge) {
  Limits limits;
  limits.max_batch_keys = 64;
  for (Op op : {Op::kPut, Op::kGet, Op::kExists, Op::kMatchPrefix, Op::kDelete}) {
    const uint64_t per_key = op == Op::kPut ? kPutEntryBytes : kKeyBytes;
    EXPECT_EQ(CodeOf(Request(op, 65, 65 * per_key), limits), ErrorCode::kBatchTooLarge);
    EXPECT_EQ(CodeOf(Request(op, 0xffffffffu, 0), limits), ErrorCode::kBatchTooLarge);
    EXPECT_TRUE(ValidateRequestHeader(Request(op, 64, 64 * per_key), limits, 2).ok());
  }
  const Status s = ValidateRequestHeader(Request(Op::kGet, 65, 65 * kKeyBytes), limits, 2);
  EXPECT_NE(s.message().find("65"), std::string::npos) << s.message();
}

TEST(Protocol, WrongBodySizeForKeyOps) {
  for (Op op : kKeyOps) {
    for (uint32_t count : {0u, 1u, 10u}) {
      const uint64_t right = uint64_t{count} * kKeyBytes;
      for (uint64_t body : {right + 1, right + kKeyBytes, right + kPutEntryBytes}) {
        EXPECT_EQ(CodeOf(Request(op, count, body)), ErrorCode::kBadFrame)
            << static_cast<int>(op) << " count " << count << " body " << body;
      }
      if (count > 0) {
        for (uint64_t body : {right - 1, right - kKeyBytes, uint64_t{0}}) {
          EXPECT_EQ(CodeOf(Request(op, count, body)), ErrorCode::kBadFrame)
              << static_cast<int>(op) << " count " << count << " body " << body;
        }
      }
    }
  }
}

TEST(Protocol, WrongBodySizeForPut) {
  // The body must at least hold the length table.
  EXPECT_EQ(CodeOf(Request(Op::kPut, 1, 0)), ErrorCode::kBadFrame);
  EXPECT_EQ(CodeOf(Request(Op::kPut, 1, kPutEntryBytes - 1)), ErrorCode::kBadFrame);
  EXPECT_EQ(CodeOf(Request(Op::kPut, 100, 100 * kPutEntryBytes - 1)), ErrorCode::kBadFrame);
  EXPECT_EQ(CodeOf(Request(Op::kPut, 100, 100 * kKeyBytes)), ErrorCode::kBadFrame);
}

TEST(Protocol, WrongBodySizeForStats) {
  for (uint64_t body : {1, 16, 4096})
    EXPECT_EQ(CodeOf(Request(Op::kStats, 0, body)), ErrorCode::kBadFrame);
}

// docs/protocol.md: the STATS request body is empty and its count is 0.
TEST(Protocol, StatsWithKeysIsBadFrame) {
  EXPECT_EQ(CodeOf(Request(Op::kStats, 1, 0)), ErrorCode::kBadFrame);
  EXPECT_EQ(CodeOf(Request(Op::kStats, 3, 3 * kKeyBytes)), ErrorCode::kBadFrame);
}

// A node that speaks only v1 takes exactly 8 bytes; v2 takes extensions up to kMaxHelloBytes.
TEST(Protocol, HelloBodySize) {
  Limits v1;
  v1.version = 1;
  for (uint64_t body : {0, 1, 7, 9, 16, 24}) {
    const Status s = ValidateRequestHeader(Request(Op::kHello, 0, body), v1, 0);
    EXPECT_EQ(s.code(), ErrorCode::kBadFrame) << body;
    EXPECT_NE(s.message().find(std::to_string(body)), std::string::npos) << s.message();
  }
  for (uint64_t body : {uint64_t{0}, uint64_t{7}, uint64_t{kMaxHelloBytes + 1}}) {
    const Status s = ValidateRequestHeader(Request(Op::kHello, 0, body), Limits{}, 0);
    EXPECT_EQ(s.code(), ErrorCode::kBadFrame) << body;
    EXPECT_NE(s.message().find(std::to_string(body)), std::string::npos) << s.message();
  }
  for (uint64_t body : {uint64_t{8}, uint64_t{9}, uint64_t{kMaxHelloBytes}}) {
    EXPECT_TRUE(ValidateRequestHeader(Request(Op::kHello, 0, body), Limits{}, 0).ok()) << body;
  }
}

// The described flag (v2) is allowed on PUT and GET only, and changes their entry sizes.
TEST(Protocol, DescribedFlag) {
  Header h = Request(Op::kGet, 2, 2 * kDescribedGetEntryBytes);
  h.flags = kFlagDescribed;
  EXPECT_TRUE(ValidateRequestHeader(h, Limits{}, 2).ok());
  EXPECT_EQ(ValidateRequestHeader(h, Limits{}, 1).code(), ErrorCode::kBadFrame);
  h.body_bytes = 2 * kKeyBytes;
  EXPECT_EQ(ValidateRequestHeader(h, Limits{}, 2).code(), ErrorCode::kBadFrame);
  Header put = Request(Op::kPut, 2, 2 * kDescribedPutEntryBytes);
  put.flags = kFlagDescribed;
  EXPECT_TRUE(ValidateRequestHeader(put, Limits{}, 2).ok());
  put.body_bytes = 2 * kDescribedPutEntryBytes - 1;
  EXPECT_EQ(ValidateRequestHeader(put, Limits{}, 2).code(), ErrorCode::kBadFrame);
  for (Op op : {Op::kExists, Op::kDelete, Op::kMatchPrefix}) {
    Header q = Request(op, 1, kKeyBytes);
    q.flags = kFlagDescribed;
    EXPECT_EQ(ValidateRequestHeader(q, Limits{}, 2).code(), ErrorCode::kBadFrame);
  }
}

TEST(Protocol, ExtensionsRoundTripAndOverrunsAreBadFrames) {
  std::string body;
  AppendExt(body, Ext::kNodeId, "0123456789abcdef");
  AppendExt(body, static_cast<Ext>(99), "");
  AppendExt(body, Ext::kTransport, std::string(1, '\1'));
  std::vector<std::pair<uint16_t, std::string>> seen;
  auto bytes = std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(body.data()), body.size());
  ASSERT_TRUE(ForEachExt(bytes, [&](uint16_t t, std::string_view v) {
                seen.emplace_back(t, std::string(v));
                return Status::Ok();
              }).ok());
  ASSERT_EQ(seen.size(), 3u);
  EXPECT_EQ(seen[0].second, "0123456789abcdef");
  EXPECT_EQ(seen[1].first, 99);
  EXPECT_EQ(seen[2].second, std::string(1, '\1'));
  auto ignore = [](uint16_t, std::string_view) { return Status::Ok(); };
  for (size_t cut = 1; cut < body.size(); ++cut) {
    // Every strict prefix that ends inside an extension is refused, never read past.
    const bool on_boundary = cut == kExtHeaderBytes + 16 || cut == 2 * kExtHeaderBytes + 16;
    const Status s = ForEachExt(bytes.first(cut), ignore);
    EXPECT_EQ(s.ok(), on_boundary) << cut;
    if (!s.ok()) EXPECT_EQ(s.code(), ErrorCode::kBadFrame);
  }
  std::string nonzero = body;
  nonzero[2] = 1;  // the u16 after the type must be zero
  EXPECT_EQ(ForEachExt(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(nonzero.data()),
                                                nonzero.size()),
                       ignore)
                .code(),
            ErrorCode::kBadFrame);
}

TEST(Protocol, ChecksRunInDocumentedOrder) {
  // A frame with several faults reports the first in the order magic, op, fields, size, batch.
  Header h = RawOp(99);
  h.magic = 0;
  h.flags = 1;
  EXPECT_EQ(CodeOf(h), ErrorCode::kBadMagic);
  h.magic = kMagic;
  EXPECT_EQ(CodeOf(h), ErrorCode::kUnknownOp);
  Header g = Request(Op::kGet, 0xffffffffu, ~uint64_t{0});
  g.reserved = 3;
  EXPECT_EQ(CodeOf(g), ErrorCode::kBadFrame);
  g.reserved = 0;
  EXPECT_EQ(CodeOf(g), ErrorCode::kFrameTooLarge);
  g.body_bytes = 7;
  EXPECT_EQ(CodeOf(g), ErrorCode::kBatchTooLarge);
}

TEST(Protocol, LargeCountsDoNotOverflow) {
  // count * 16 and count * 24 are computed in 64 bits: a huge count cannot wrap to a small body.
  Limits limits;
  limits.max_batch_keys = std::numeric_limits<uint32_t>::max();
  limits.max_frame_bytes = ~uint64_t{0};
  const uint32_t count = 0x10000000u;  // * 16 = 2^32: wraps to 0 in 32-bit arithmetic
  EXPECT_EQ(CodeOf(Request(Op::kGet, count, 0), limits), ErrorCode::kBadFrame);
  EXPECT_TRUE(
      ValidateRequestHeader(Request(Op::kGet, count, uint64_t{count} * kKeyBytes), limits, 2).ok());
  EXPECT_EQ(CodeOf(Request(Op::kPut, count, 0), limits), ErrorCode::kBadFrame);
}

TEST(Protocol, LimitsRoundTrip) {
  Limits in;
  in.version = 7;
  in.max_batch_keys = 0xdeadbeefu;
  in.max_frame_bytes = 0x0123456789abcdefull;
  in.max_block_bytes = ~uint64_t{0} - 1;
  uint8_t raw[kHelloReplyBytes];
  EncodeLimits(in, raw);
  const Limits out = DecodeLimits(raw);
  EXPECT_EQ(out.version, in.version);
  EXPECT_EQ(out.max_batch_keys, in.max_batch_keys);
  EXPECT_EQ(out.max_frame_bytes, in.max_frame_bytes);
  EXPECT_EQ(out.max_block_bytes, in.max_block_bytes);
  // Packed little-endian at offsets 0, 4, 8, 16.
  EXPECT_EQ(raw[0], 7);
  EXPECT_EQ(raw[4], 0xef);
  EXPECT_EQ(raw[7], 0xde);
  EXPECT_EQ(raw[8], 0xef);
  EXPECT_EQ(raw[15], 0x01);
  EXPECT_EQ(raw[16], 0xfe);
  EXPECT_EQ(raw[23], 0xff);

  const Limits defaults;
  EncodeLimits(defaults, raw);
  const Limits d = DecodeLimits(raw);
  EXPECT_EQ(d.version, kVersion);
  EXPECT_EQ(d.max_batch_keys, 4096u);
  EXPECT_EQ(d.max_frame_bytes, uint64_t{1} << 30);
  EXPECT_EQ(d.max_block_bytes, uint64_t{256} << 20);
}

// Rule: AUTH (v2) carries exactly a 32-byte proof and no count; on a v1 connection it is an
// unknown op, as it was for v1 nodes.
TEST(Protocol, AuthFrames) {
  const Limits limits;
  EXPECT_TRUE(ValidateRequestHeader(Request(Op::kAuth, 0, kAuthProofBytes), limits, 2).ok());
  EXPECT_EQ(ValidateRequestHeader(Request(Op::kAuth, 0, 16), limits, 2).code(),
            ErrorCode::kBadFrame);
  EXPECT_EQ(ValidateRequestHeader(Request(Op::kAuth, 1, kAuthProofBytes), limits, 2).code(),
            ErrorCode::kBadFrame);
  const Status v1 = ValidateRequestHeader(Request(Op::kAuth, 0, kAuthProofBytes), limits, 1);
  EXPECT_EQ(v1.code(), ErrorCode::kUnknownOp);
  EXPECT_NE(v1.message().find("version 2"), std::string::npos) << v1.message();
}

}  // namespace
}  // namespace kvpool::protocol
