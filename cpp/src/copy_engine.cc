#include "kvpool/copy_engine.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <thread>
#include <unordered_set>

#include "kvpool/copy_plan.h"

namespace kvpool {

namespace {

Status Invalid(std::string message) {
  return Status(ErrorCode::kInvalidArgument, std::move(message));
}

}  // namespace

Status ValidateRegions(std::span<const KVRegion> regions) {
  if (regions.empty()) return Invalid("a copy engine needs at least one KV region");
  for (size_t r = 0; r < regions.size(); ++r) {
    const KVRegion& g = regions[r];
    const std::string name = "KV region " + std::to_string(r);
    if (g.base == 0) return Invalid(name + " has a null base address");
    if (g.num_blocks == 0) return Invalid(name + " has num_blocks = 0");
    if (g.bytes == 0) return Invalid(name + " has bytes = 0");
    if (g.num_blocks > 1 && g.bytes > g.stride) {
      return Invalid(name + ": bytes = " + std::to_string(g.bytes) + " exceed stride = " +
                     std::to_string(g.stride) + ", so consecutive blocks would overlap");
    }
  }
  return Status::Ok();
}

CopyEngine::CopyEngine(std::vector<KVRegion> regions) : regions_(std::move(regions)) {
  num_blocks_ = regions_.empty() ? 0 : regions_[0].num_blocks;
  for (const KVRegion& g : regions_) {
    object_bytes_ += g.bytes;
    num_blocks_ = std::min(num_blocks_, g.num_blocks);
  }
}

Status CopyEngine::CheckCall(const char* op, std::span<const uint32_t> block_ids,
                             size_t staging_bytes, bool distinct) const {
  for (size_t i = 0; i < block_ids.size(); ++i) {
    if (block_ids[i] >= num_blocks_) {
      return Invalid(std::string(op) + ": block id " + std::to_string(block_ids[i]) +
                     " (position " + std::to_string(i) + ") is outside the cache's [0, " +
                     std::to_string(num_blocks_) + ")");
    }
  }
  const uint64_t need = block_ids.size() * object_bytes_;
  if (staging_bytes < need) {
    return Invalid(std::string(op) + ": staging holds " + std::to_string(staging_bytes) +
                   " bytes, " + std::to_string(block_ids.size()) + " blocks of " +
                   std::to_string(object_bytes_) + " bytes need " + std::to_string(need));
  }
  if (distinct && block_ids.size() > 1) {
    std::vector<uint32_t> sorted(block_ids.begin(), block_ids.end());
    std::sort(sorted.begin(), sorted.end());
    const auto dup = std::adjacent_find(sorted.begin(), sorted.end());
    if (dup != sorted.end()) {
      return Invalid(std::string(op) + ": block id " + std::to_string(*dup) +
                     " appears more than once");
    }
  }
  return Status::Ok();
}

Status CopyEngine::Gather(std::span<const uint32_t> block_ids, std::span<uint8_t> staging) {
  auto ticket = StartGather(block_ids, staging);
  return ticket.ok() ? Wait(ticket.value()) : ticket.status();
}

Status CopyEngine::Scatter(std::span<const uint32_t> block_ids, std::span<const uint8_t> staging) {
  auto ticket = StartScatter(block_ids, staging);
  return ticket.ok() ? Wait(ticket.value()) : ticket.status();
}

Status CopyEngine::UnknownTicket(CopyTicket ticket) {
  return Invalid("copy ticket " + std::to_string(ticket) +
                 " is not a copy in flight (never started, or already waited for)");
}

namespace {

class CpuCopyEngine final : public CopyEngine {
 public:
  CpuCopyEngine(std::vector<KVRegion> regions, unsigned threads, uint64_t parallel_bytes)
      : CopyEngine(std::move(regions)),
        threads_(std::max(1u, threads)),
        parallel_bytes_(parallel_bytes) {}

  const char* device() const override { return "cpu"; }

  // The copy is done when Start returns; the ticket only has to be waited for once.
  Result<CopyTicket> StartGather(std::span<const uint32_t> block_ids,
                                 std::span<uint8_t> staging) override {
    if (Status s = CheckCall("gather", block_ids, staging.size(), false); !s.ok()) return s;
    Run(block_ids, reinterpret_cast<uint64_t>(staging.data()), CopyDirection::kGather);
    return Issue();
  }

  Result<CopyTicket> StartScatter(std::span<const uint32_t> block_ids,
                                  std::span<const uint8_t> staging) override {
    if (Status s = CheckCall("scatter", block_ids, staging.size(), true); !s.ok()) return s;
    Run(block_ids, reinterpret_cast<uint64_t>(staging.data()), CopyDirection::kScatter);
    return Issue();
  }

  Status Wait(CopyTicket ticket) override {
    std::lock_guard<std::mutex> lock(mu_);
    return done_.erase(ticket) == 1 ? Status::Ok() : UnknownTicket(ticket);
  }

 private:
  /// Plans the call and copies it: on the calling thread for small copies, else split into up
  /// to threads_ equal byte ranges of the plan (the caller copies the first).
  void Run(std::span<const uint32_t> block_ids, uint64_t staging, CopyDirection direction) {
    std::vector<CopyRun> runs;  // per call: engines may be called from several threads
    PlanCopies(regions_, block_ids, staging, direction, &runs);
    const uint64_t total = PlanBytes(runs);
    const uint64_t parts = total < parallel_bytes_ ? 1 : std::min<uint64_t>(threads_, total);
    if (parts <= 1) {
      CopyRange(runs, 0, total);
      return;
    }
    std::vector<std::thread> helpers;
    helpers.reserve(parts - 1);
    for (uint64_t p = 1; p < parts; ++p) {
      helpers.emplace_back([&runs, lo = total * p / parts, hi = total * (p + 1) / parts] {
        CopyRange(runs, lo, hi);
      });
    }
    CopyRange(runs, 0, total / parts);
    for (auto& t : helpers) t.join();
  }

  /// Copies bytes [lo, hi) of the plan (its runs laid end to end).
  static void CopyRange(const std::vector<CopyRun>& runs, uint64_t lo, uint64_t hi) {
    uint64_t at = 0;  // plan offset of the current run
    for (const CopyRun& r : runs) {
      const uint64_t begin = std::max(lo, at), end = std::min(hi, at + r.bytes);
      if (begin < end) {
        std::memcpy(reinterpret_cast<uint8_t*>(r.dst + (begin - at)),
                    reinterpret_cast<const uint8_t*>(r.src + (begin - at)), end - begin);
      }
      at += r.bytes;
      if (at >= hi) break;
    }
  }

  CopyTicket Issue() {
    std::lock_guard<std::mutex> lock(mu_);
    done_.insert(++last_);
    return last_;
  }

  const unsigned threads_;
  const uint64_t parallel_bytes_;
  std::mutex mu_;
  CopyTicket last_ = 0;
  std::unordered_set<CopyTicket> done_;  // finished, not yet waited for
};

}  // namespace

Result<std::unique_ptr<CopyEngine>> MakeCpuCopyEngine(std::vector<KVRegion> regions,
                                                      unsigned threads, uint64_t parallel_bytes) {
  if (Status s = ValidateRegions(regions); !s.ok()) return s;
  return std::unique_ptr<CopyEngine>(
      new CpuCopyEngine(std::move(regions), threads, parallel_bytes));
}

}  // namespace kvpool
