// Key hashing: the chained XXH3-128 block keys of a prompt (README "Key format").
// Target (issue 2): a 128k-token prompt in well under 1 ms.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <vector>

#include "kvpool/hashing.h"

namespace {

std::vector<uint32_t> Tokens(size_t n) {
  std::vector<uint32_t> tokens(n);
  uint64_t x = 88172645463325252ull;
  for (auto& t : tokens) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    t = static_cast<uint32_t>(x % 128256);  // a Llama-3-sized vocabulary
  }
  return tokens;
}

// Args: tokens, block_tokens. Items are tokens; bytes are the token bytes hashed.
void BM_ChainBlockKeys(benchmark::State& state) {
  const auto n = static_cast<size_t>(state.range(0));
  const auto block_tokens = static_cast<uint32_t>(state.range(1));
  const std::vector<uint32_t> tokens = Tokens(n);
  kvpool::Namespace ns;
  ns.model = "meta-llama/Llama-3.1-8B";
  ns.block_tokens = block_tokens;
  const kvpool::Key128 fingerprint = ns.Fingerprint().value();
  std::vector<kvpool::Key128> keys;
  keys.reserve(n / block_tokens);
  for (auto _ : state) {
    keys.clear();
    kvpool::ChainBlockKeys(fingerprint, tokens, block_tokens, &keys);
    benchmark::DoNotOptimize(keys.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * n));
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n * sizeof(uint32_t)));
  state.counters["keys"] = static_cast<double>(n / block_tokens);
}
BENCHMARK(BM_ChainBlockKeys)
    ->ArgNames({"tokens", "block_tokens"})
    ->ArgsProduct({{1 << 10, 4 << 10, 16 << 10, 64 << 10, 128 << 10}, {16}})
    ->Args({128 << 10, 32})
    ->Args({128 << 10, 256})
    ->Unit(benchmark::kMicrosecond);

// The whole user-visible cost for one request: fingerprint (uncached) plus the chain.
void BM_FingerprintAndChain128k(benchmark::State& state) {
  const std::vector<uint32_t> tokens = Tokens(128 << 10);
  kvpool::Namespace ns;
  ns.model = "meta-llama/Llama-3.1-8B";
  ns.revision = "main";
  ns.dtype = "bfloat16";
  ns.salts["lora"] = "adapter-1";
  std::vector<kvpool::Key128> keys;
  keys.reserve(tokens.size() / ns.block_tokens);
  for (auto _ : state) {
    keys.clear();
    const kvpool::Key128 fp = ns.Fingerprint().value();
    kvpool::ChainBlockKeys(fp, tokens, ns.block_tokens, &keys);
    benchmark::DoNotOptimize(keys.data());
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * tokens.size()));
  state.SetBytesProcessed(
      static_cast<int64_t>(state.iterations() * tokens.size() * sizeof(uint32_t)));
}
BENCHMARK(BM_FingerprintAndChain128k)->Unit(benchmark::kMicrosecond);

void BM_Fingerprint(benchmark::State& state) {
  kvpool::Namespace ns;
  ns.model = "meta-llama/Llama-3.1-8B";
  ns.salts["lora"] = "adapter-1";
  for (auto _ : state) benchmark::DoNotOptimize(ns.Fingerprint().value());
}
BENCHMARK(BM_Fingerprint);

}  // namespace
