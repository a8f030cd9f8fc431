// BlockStore hot paths: reserve -> commit, pin -> unpin, and writes that must evict.
// Sweeps: block size (bytes) x batch size (blocks per call). Items processed count blocks. Bytes
// processed count block bytes written into the pool (fill=1 and eviction runs) or pinned for a
// reader (BM_PinUnpin); metadata-only reserve/commit runs report items only.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "kvpool/block_store.h"

namespace {

using kvpool::BlockStore;
using kvpool::Key128;
using kvpool::PinnedBlock;
using kvpool::PutResult;
using kvpool::Reservation;

std::unique_ptr<BlockStore> MakeStore(size_t capacity, kvpool::EvictionKind eviction,
                                      double watermark) {
  kvpool::BlockStoreOptions options;
  options.capacity = capacity;
  options.hugepages = kvpool::HugePages::kAuto;
  options.eviction = eviction;
  options.high_watermark = watermark;
  return std::move(BlockStore::Create(options).value());
}

Key128 KeyOf(uint64_t i) { return kvpool::Hash128(&i, sizeof i); }

/// One batch through reserve -> (fill) -> commit. Returns false when a block was not reserved.
bool PutBatch(BlockStore& store, uint64_t* next_id, size_t block, size_t batch, bool fill,
              std::vector<Key128>& keys, std::vector<uint64_t>& sizes,
              std::vector<PutResult>& results, std::vector<Reservation>& res,
              std::unique_ptr<bool[]>& stored) {
  for (size_t i = 0; i < batch; ++i) keys[i] = KeyOf((*next_id)++);
  store.Reserve(keys, sizes, results, res);
  for (size_t i = 0; i < batch; ++i) {
    if (results[i] != PutResult::kReserved) return false;
    if (fill) std::memset(res[i].data, static_cast<int>(i), block);
  }
  store.Commit(keys, res, std::span<bool>(stored.get(), batch));
  return true;
}

// Args: block bytes, batch, fill (0: metadata only, 1: also write the block bytes into the pool,
// as the server's receive path does). Every batch is deleted again so the store never evicts.
void BM_ReserveCommit(benchmark::State& state) {
  const auto block = static_cast<size_t>(state.range(0));
  const auto batch = static_cast<size_t>(state.range(1));
  const bool fill = state.range(2) != 0;
  auto store = MakeStore(size_t{256} << 20, kvpool::EvictionKind::kS3Fifo, 0.95);
  std::vector<Key128> keys(batch);
  std::vector<uint64_t> sizes(batch, block);
  std::vector<PutResult> results(batch);
  std::vector<Reservation> res(batch);
  std::unique_ptr<bool[]> flags(new bool[batch]);
  uint64_t next = 0;
  for (auto _ : state) {
    if (!PutBatch(*store, &next, block, batch, fill, keys, sizes, results, res, flags)) {
      state.SkipWithError("reserve failed");
      break;
    }
    store->Delete(keys, std::span<bool>(flags.get(), batch));
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * batch));
  if (fill) state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * batch * block));
}
BENCHMARK(BM_ReserveCommit)
    ->ArgNames({"block", "batch", "fill"})
    ->ArgsProduct({{4 << 10, 64 << 10, 256 << 10, 2 << 20}, {1, 32}, {0, 1}});

// Args: block bytes, batch. Pins `batch` committed blocks (reading one byte of each, as a reply
// would start to) and unpins them. Bytes processed: bytes pinned, i.e. handed to a reader without
// a copy (the socket write that follows is not part of this benchmark).
void BM_PinUnpin(benchmark::State& state) {
  const auto block = static_cast<size_t>(state.range(0));
  const auto batch = static_cast<size_t>(state.range(1));
  const size_t capacity = size_t{256} << 20;
  auto store = MakeStore(capacity, kvpool::EvictionKind::kS3Fifo, 0.95);
  const size_t resident = std::min<size_t>(capacity / 2 / block, 4096);
  std::vector<Key128> all(resident);
  {
    std::vector<Key128> k(1);
    std::vector<uint64_t> s(1, block);
    std::vector<PutResult> r(1);
    std::vector<Reservation> res(1);
    std::unique_ptr<bool[]> f(new bool[1]);
    uint64_t next = 0;
    for (size_t i = 0; i < resident; ++i) {
      PutBatch(*store, &next, block, 1, true, k, s, r, res, f);
      all[i] = k[0];
    }
  }
  std::vector<Key128> keys(batch);
  std::vector<PinnedBlock> pinned(batch);
  std::unique_ptr<bool[]> found(new bool[batch]);
  size_t cursor = 0;
  uint64_t sink = 0;
  for (auto _ : state) {
    for (size_t i = 0; i < batch; ++i) keys[i] = all[(cursor + i * 7919) % resident];
    cursor = (cursor + 1) % resident;
    store->Pin(keys, pinned, std::span<bool>(found.get(), batch));
    for (size_t i = 0; i < batch; ++i) sink += pinned[i].data[0];
    store->Unpin(pinned);
  }
  benchmark::DoNotOptimize(sink);
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * batch));
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * batch * block));
}
BENCHMARK(BM_PinUnpin)
    ->ArgNames({"block", "batch"})
    ->ArgsProduct({{4 << 10, 64 << 10, 2 << 20}, {1, 32, 256}});

// Args: block bytes, batch, policy (0 s3fifo, 1 lru). The store is kept full, so every block
// written evicts one; blocks are filled (memset) as the receive path would.
void BM_EvictUnderPressure(benchmark::State& state) {
  const auto block = static_cast<size_t>(state.range(0));
  const auto batch = static_cast<size_t>(state.range(1));
  const auto kind =
      state.range(2) == 0 ? kvpool::EvictionKind::kS3Fifo : kvpool::EvictionKind::kLru;
  auto store = MakeStore(size_t{128} << 20, kind, 0.9);
  std::vector<Key128> keys(batch);
  std::vector<uint64_t> sizes(batch, block);
  std::vector<PutResult> results(batch);
  std::vector<Reservation> res(batch);
  std::unique_ptr<bool[]> flags(new bool[batch]);
  uint64_t next = 0;
  // Fill to the watermark first.
  while (store->Stats().evictions == 0) {
    if (!PutBatch(*store, &next, block, batch, true, keys, sizes, results, res, flags)) break;
  }
  const uint64_t evictions_before = store->Stats().evictions;
  for (auto _ : state) {
    if (!PutBatch(*store, &next, block, batch, true, keys, sizes, results, res, flags)) {
      state.SkipWithError("reserve failed");
      break;
    }
  }
  const auto s = store->Stats();
  state.counters["evictions_per_block"] = static_cast<double>(s.evictions - evictions_before) /
                                          static_cast<double>(state.iterations() * batch);
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * batch));
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * batch * block));
}
BENCHMARK(BM_EvictUnderPressure)
    ->ArgNames({"block", "batch", "lru"})
    ->ArgsProduct({{4 << 10, 64 << 10, 256 << 10, 2 << 20}, {1, 32}, {0, 1}});

}  // namespace
