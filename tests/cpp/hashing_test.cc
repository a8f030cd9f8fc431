// Known-answer tests for the key format of README "Key format". The expected hex values were
// computed independently from the README text with the Python `xxhash` package (xxh3_128_digest),
// not with this library, so a change to the byte format fails here.
#include "kvpool/hashing.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

namespace kvpool {
namespace {

Namespace DefaultNamespace() {
  Namespace ns;
  ns.model = "m";
  return ns;
}

Namespace FullNamespace() {
  Namespace ns;
  ns.model = "meta-llama/Llama-3.1-8B";
  ns.revision = "5206a32";
  ns.dtype = "bfloat16";
  ns.kv_layout = "NHD";
  ns.attention_backend = "flash_attn";
  ns.block_tokens = 32;
  ns.tp_size = 4;
  ns.tp_rank = 3;
  ns.layer_begin = 8;
  ns.layer_end = 16;
  // Inserted out of order: the canonical form sorts salts by name.
  ns.salts["lora"] = "sql-adapter";
  ns.salts["cache_salt"] = "tenant-7";
  return ns;
}

Key128 FingerprintOf(const Namespace& ns) {
  auto fp = ns.Fingerprint();
  EXPECT_TRUE(fp.ok()) << fp.status().ToString();
  return fp.ok() ? fp.value() : Key128{};
}

std::vector<std::string> Hexes(const std::vector<Key128>& keys) {
  std::vector<std::string> out;
  for (const Key128& k : keys) out.push_back(k.Hex());
  return out;
}

std::vector<uint32_t> Iota(size_t n) {
  std::vector<uint32_t> v(n);
  std::iota(v.begin(), v.end(), 0u);
  return v;
}

TEST(Hashing, CanonicalOfDefaultNamespace) {
  EXPECT_EQ(DefaultNamespace().Canonical(),
            "kvpool-namespace-v1;model=1:m;revision=0:;dtype=0:;kv_layout=0:;attention_backend=0:;"
            "block_tokens=2:16;tp_size=1:1;tp_rank=1:0;layer_begin=1:0;layer_end=2:-1;");
}

TEST(Hashing, CanonicalOfFullNamespaceSortsSalts) {
  EXPECT_EQ(FullNamespace().Canonical(),
            "kvpool-namespace-v1;model=23:meta-llama/Llama-3.1-8B;revision=7:5206a32;"
            "dtype=8:bfloat16;kv_layout=3:NHD;attention_backend=10:flash_attn;block_tokens=2:32;"
            "tp_size=1:4;tp_rank=1:3;layer_begin=1:8;layer_end=2:16;salt.cache_salt=8:tenant-7;"
            "salt.lora=11:sql-adapter;");
}

TEST(Hashing, CanonicalLengthCountsUtf8Bytes) {
  Namespace ns;
  ns.model = "mod\xc3\xa8le";  // "modèle": 6 characters, 7 bytes
  EXPECT_EQ(ns.Canonical().substr(0, 36), "kvpool-namespace-v1;model=7:mod\xc3\xa8le;");
  EXPECT_EQ(FingerprintOf(ns).Hex(), "1b21e802215d38b9c392a6de9749c8f8");
}

TEST(Hashing, FingerprintKnownAnswers) {
  EXPECT_EQ(FingerprintOf(DefaultNamespace()).Hex(), "ece020d6b3a4aa0a355360d56b3f92c7");
  EXPECT_EQ(FingerprintOf(FullNamespace()).Hex(), "bd509a0e0fbd77779f898268cc81fdcf");
}

TEST(Hashing, Hash128IsCanonicalXxh3OfBytes) {
  const std::string c = DefaultNamespace().Canonical();
  EXPECT_EQ(Hash128(c.data(), c.size()).Hex(), "ece020d6b3a4aa0a355360d56b3f92c7");
}

TEST(Hashing, ChainBlockKeysKnownAnswersIgnorePartialBlock) {
  const Key128 fp = FingerprintOf(DefaultNamespace());
  const std::vector<uint32_t> tokens = Iota(40);  // 2 full blocks of 16 + 8 trailing tokens
  std::vector<Key128> keys;
  ChainBlockKeys(fp, tokens, 16, &keys);
  EXPECT_EQ(Hexes(keys), (std::vector<std::string>{"bf18b3a1ab69a09309f7fa34be51ac4e",
                                                   "d723c43c012cd2dff2cd8d29036f7abd"}));
}

TEST(Hashing, ChainBlockKeysKnownAnswersFullNamespace) {
  const Key128 fp = FingerprintOf(FullNamespace());
  std::vector<uint32_t> tokens(96);
  for (size_t i = 0; i < tokens.size(); ++i) {
    tokens[i] = static_cast<uint32_t>((uint64_t{i} * 2654435761u) % 128256u);
  }
  std::vector<Key128> keys;
  ChainBlockKeys(fp, tokens, 32, &keys);
  EXPECT_EQ(Hexes(keys), (std::vector<std::string>{"b6c83d7d77a73c1ddf4a9c745979c76c",
                                                   "48c5839a523d7f9c361aec4121017111",
                                                   "2f47ccf869d920748496abff05b820cd"}));
}

TEST(Hashing, TokensAreLittleEndianUint32) {
  const Key128 fp = FingerprintOf(DefaultNamespace());
  std::vector<uint32_t> tokens;
  for (int i = 0; i < 4; ++i) tokens.insert(tokens.end(), {0xDEADBEEFu, 1u, 0xFFFFFFFFu, 256u});
  std::vector<Key128> keys;
  ChainBlockKeys(fp, tokens, 16, &keys);
  ASSERT_EQ(keys.size(), 1u);
  EXPECT_EQ(keys[0].Hex(), "20bbeb009817bfb48b040ae2f2b5ea55");
}

TEST(Hashing, KeysOfAPrefixAreThePrefixOfTheKeys) {
  const Key128 fp = FingerprintOf(DefaultNamespace());
  std::vector<uint32_t> tokens(16 * 50 + 7);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<uint32_t>(i * 7919 + 13);
  std::vector<Key128> all;
  ChainBlockKeys(fp, tokens, 16, &all);
  ASSERT_EQ(all.size(), 50u);
  for (size_t len : {0, 1, 15, 16, 17, 160, 161, 799, 800, 807}) {
    std::vector<Key128> part;
    ChainBlockKeys(fp, std::span<const uint32_t>(tokens.data(), len), 16, &part);
    ASSERT_EQ(part.size(), len / 16) << "prefix of " << len << " tokens";
    for (size_t i = 0; i < part.size(); ++i)
      EXPECT_EQ(part[i], all[i]) << "len " << len << " key " << i;
  }
  // A change in block 3 changes every key from block 3 on and none before.
  std::vector<uint32_t> changed = tokens;
  changed[3 * 16 + 5] ^= 1;
  std::vector<Key128> other;
  ChainBlockKeys(fp, changed, 16, &other);
  ASSERT_EQ(other.size(), all.size());
  for (size_t i = 0; i < all.size(); ++i) {
    if (i < 3) {
      EXPECT_EQ(other[i], all[i]) << i;
    } else {
      EXPECT_NE(other[i], all[i]) << i;
    }
  }
}

TEST(Hashing, ChainBlockKeysAppendsToOutput) {
  const Key128 fp = FingerprintOf(DefaultNamespace());
  std::vector<Key128> keys = {fp};
  ChainBlockKeys(fp, Iota(40), 16, &keys);
  ASSERT_EQ(keys.size(), 3u);
  EXPECT_EQ(keys[0], fp);
  EXPECT_EQ(keys[1].Hex(), "bf18b3a1ab69a09309f7fa34be51ac4e");
}

TEST(Hashing, EveryNamespaceFieldChangesTheFingerprint) {
  const Key128 base = FingerprintOf(DefaultNamespace());
  std::vector<Namespace> variants(12, DefaultNamespace());
  variants[0].model = "n";
  variants[1].revision = "r";
  variants[2].dtype = "fp8";
  variants[3].kv_layout = "HND";
  variants[4].attention_backend = "flashinfer";
  variants[5].block_tokens = 32;
  variants[6].tp_size = 2;
  variants[7].tp_size = 2;
  variants[7].tp_rank = 1;
  variants[8].layer_begin = 1;
  variants[9].layer_end = 10;
  variants[10].salts["lora"] = "";
  variants[11].salts["lora"] = "x";
  std::vector<Key128> seen = {base};
  for (size_t i = 0; i < variants.size(); ++i) {
    const Key128 fp = FingerprintOf(variants[i]);
    for (const Key128& s : seen) EXPECT_NE(fp, s) << "variant " << i;
    seen.push_back(fp);
  }
}

TEST(Hashing, LengthPrefixesKeepFieldsApart) {
  // Without length prefixes these two would serialise to the same text.
  Namespace a = DefaultNamespace(), b = DefaultNamespace();
  a.model = "m;revision=0:";
  b.model = "m";
  b.revision = ";revision=0:";
  EXPECT_NE(a.Canonical(), b.Canonical());
  EXPECT_NE(FingerprintOf(a), FingerprintOf(b));
}

TEST(Hashing, FingerprintRejectsZeroBlockTokens) {
  Namespace ns = DefaultNamespace();
  ns.block_tokens = 0;
  auto fp = ns.Fingerprint();
  ASSERT_FALSE(fp.ok());
  EXPECT_EQ(fp.status().code(), ErrorCode::kInvalidArgument);
}

TEST(Hashing, FingerprintRejectsRankOutsideTpSize) {
  for (auto [size, rank] : {std::pair<uint32_t, uint32_t>{1, 1}, {4, 4}, {4, 7}, {0, 0}}) {
    Namespace ns = DefaultNamespace();
    ns.tp_size = size;
    ns.tp_rank = rank;
    auto fp = ns.Fingerprint();
    ASSERT_FALSE(fp.ok()) << "tp_size " << size << " tp_rank " << rank;
    EXPECT_EQ(fp.status().code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(fp.status().message().find(std::to_string(rank)), std::string::npos)
        << fp.status().message();
  }
  Namespace ok = DefaultNamespace();
  ok.tp_size = 4;
  ok.tp_rank = 3;
  EXPECT_TRUE(ok.Fingerprint().ok());
}

TEST(Hashing, ZeroBlockTokensChainsNothing) {
  std::vector<Key128> keys;
  ChainBlockKeys(Key128{}, Iota(64), 0, &keys);
  EXPECT_TRUE(keys.empty());
}

TEST(Hashing, HexAndFromBytesRoundTrip) {
  Key128 k;
  for (size_t i = 0; i < 16; ++i) k.bytes[i] = static_cast<uint8_t>(i * 17);
  EXPECT_EQ(k.Hex(), "00112233445566778899aabbccddeeff");
  EXPECT_EQ(Key128::FromBytes(k.bytes.data()), k);
  // Low64 reads bytes 8..15 in host (little-endian) order.
  EXPECT_EQ(k.Low64(), 0xffeeddccbbaa9988ull);
}

}  // namespace
}  // namespace kvpool
