// Block keys: the namespace fingerprint and the chained 128-bit block hash (README "Key format").
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "kvpool/status.h"

namespace kvpool {

/// A 128-bit block key in XXH3's canonical byte order (big-endian high 64 bits, then low 64 bits).
struct Key128 {
  std::array<uint8_t, 16> bytes{};

  bool operator==(const Key128& other) const { return bytes == other.bytes; }
  bool operator!=(const Key128& other) const { return bytes != other.bytes; }
  /// 64 well-mixed bits, for hash tables and placement.
  uint64_t Low64() const {
    uint64_t v;
    std::memcpy(&v, bytes.data() + 8, sizeof v);
    return v;
  }
  /// Lower-case hexadecimal, 32 characters.
  std::string Hex() const;
  static Key128 FromBytes(const void* data);
};

/// XXH3-128 of `data`, as a Key128.
Key128 Hash128(const void* data, size_t size);

/// Everything that changes the bytes of a KV block besides its tokens. Two engines share blocks
/// exactly when their namespaces (and tokens) agree.
struct Namespace {
  std::string model;
  std::string revision;
  std::string dtype;
  std::string kv_layout;
  std::string attention_backend;
  uint32_t block_tokens = 16;
  uint32_t tp_size = 1;
  uint32_t tp_rank = 0;
  int32_t layer_begin = 0;
  int32_t layer_end = -1;                    ///< Exclusive; -1 = all layers.
  std::map<std::string, std::string> salts;  ///< Request-level salts (LoRA name, cache salt, ...).

  /// The canonical description hashed into the fingerprint (README "Key format"): a versioned,
  /// length-prefixed field list, so no value can be mistaken for another field.
  std::string Canonical() const;
  /// k_{-1}: XXH3-128 of Canonical(). InvalidArgument when block_tokens is 0 or tp_rank >= tp_size.
  Result<Key128> Fingerprint() const;
};

/// Chained keys of the full blocks of `tokens`: k_i = XXH3-128(k_{i-1} || LE32(tokens of block i)),
/// k_{-1} = `fingerprint`. A trailing partial block gets no key. Appends to `out`.
void ChainBlockKeys(const Key128& fingerprint, std::span<const uint32_t> tokens,
                    uint32_t block_tokens, std::vector<Key128>* out);

}  // namespace kvpool

template <>
struct std::hash<kvpool::Key128> {
  size_t operator()(const kvpool::Key128& key) const noexcept { return key.Low64(); }
};
