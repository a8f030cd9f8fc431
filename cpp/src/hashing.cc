#include "kvpool/hashing.h"

#include <bit>

#define XXH_INLINE_ALL
#include <xxhash.h>

namespace kvpool {
namespace {

static_assert(
    std::endian::native == std::endian::little,
    "the key format encodes tokens as little-endian; add a byte swap for big-endian hosts");

Key128 FromXxh(XXH128_hash_t h) {
  XXH128_canonical_t canonical;
  XXH128_canonicalFromHash(&canonical, h);
  return Key128::FromBytes(canonical.digest);
}

void AppendField(std::string* out, const char* name, const std::string& value) {
  // name=<decimal length>:<value>; -- the length makes every value self-delimiting.
  out->append(name);
  out->push_back('=');
  out->append(std::to_string(value.size()));
  out->push_back(':');
  out->append(value);
  out->push_back(';');
}

}  // namespace

std::string Key128::Hex() const {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string s(32, '0');
  for (size_t i = 0; i < bytes.size(); ++i) {
    s[2 * i] = kDigits[bytes[i] >> 4];
    s[2 * i + 1] = kDigits[bytes[i] & 0xf];
  }
  return s;
}

Key128 Key128::FromBytes(const void* data) {
  Key128 k;
  std::memcpy(k.bytes.data(), data, k.bytes.size());
  return k;
}

Key128 Hash128(const void* data, size_t size) { return FromXxh(XXH3_128bits(data, size)); }

std::string Namespace::Canonical() const {
  std::string s = "kvpool-namespace-v1;";
  AppendField(&s, "model", model);
  AppendField(&s, "revision", revision);
  AppendField(&s, "dtype", dtype);
  AppendField(&s, "kv_layout", kv_layout);
  AppendField(&s, "attention_backend", attention_backend);
  AppendField(&s, "block_tokens", std::to_string(block_tokens));
  AppendField(&s, "tp_size", std::to_string(tp_size));
  AppendField(&s, "tp_rank", std::to_string(tp_rank));
  AppendField(&s, "layer_begin", std::to_string(layer_begin));
  AppendField(&s, "layer_end", std::to_string(layer_end));
  // std::map iterates in byte order of the names: the canonical order.
  for (const auto& [name, value] : salts) AppendField(&s, ("salt." + name).c_str(), value);
  return s;
}

Result<Key128> Namespace::Fingerprint() const {
  if (block_tokens == 0) return Status(ErrorCode::kInvalidArgument, "block_tokens must be > 0");
  if (tp_size == 0 || tp_rank >= tp_size) {
    return Status(
        ErrorCode::kInvalidArgument,
        "tp_rank " + std::to_string(tp_rank) + " is outside tp_size " + std::to_string(tp_size));
  }
  const std::string canonical = Canonical();
  return Hash128(canonical.data(), canonical.size());
}

void ChainBlockKeys(const Key128& fingerprint, std::span<const uint32_t> tokens,
                    uint32_t block_tokens, std::vector<Key128>* out) {
  if (block_tokens == 0) return;
  const size_t blocks = tokens.size() / block_tokens;
  const size_t block_bytes = size_t{block_tokens} * sizeof(uint32_t);
  out->reserve(out->size() + blocks);
  // One reusable buffer: the previous key followed by this block's tokens.
  std::vector<uint8_t> buf(16 + block_bytes);
  std::memcpy(buf.data(), fingerprint.bytes.data(), 16);
  for (size_t b = 0; b < blocks; ++b) {
    std::memcpy(buf.data() + 16, tokens.data() + b * block_tokens, block_bytes);
    XXH128_canonical_t canonical;
    XXH128_canonicalFromHash(&canonical, XXH3_128bits(buf.data(), buf.size()));
    std::memcpy(buf.data(), canonical.digest, 16);
    out->push_back(Key128::FromBytes(canonical.digest));
  }
}

}  // namespace kvpool
