#include "kvpool/staging.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "kvpool/memory_pool.h"

namespace kvpool {
namespace {
constexpr size_t kRound = size_t{2} << 20;  // whole transparent hugepages where shmem allows them
#ifdef MADV_POPULATE_WRITE
constexpr int kMadvPopulateWrite = MADV_POPULATE_WRITE;
#else
constexpr int kMadvPopulateWrite =
    23;  // Linux 5.14; older kernels answer EINVAL (pages fault later)
#endif
}  // namespace

Result<std::shared_ptr<StagingArena>> StagingArena::Create(size_t bytes) {
  if (bytes == 0) return Status(ErrorCode::kInvalidArgument, "staging arena of 0 bytes");
  const size_t rounded = (bytes + kRound - 1) / kRound * kRound;
  const int fd = memfd_create("kvpool-staging", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) {
    return Status(ErrorCode::kNoSpace, std::string("memfd_create: ") + std::strerror(errno));
  }
  auto fail = [&](const char* what) {
    const int err = errno;
    ::close(fd);
    return Status(ErrorCode::kNoSpace, "staging arena of " + std::to_string(rounded) +
                                           " bytes: " + what + ": " + std::strerror(err));
  };
  if (ftruncate(fd, static_cast<off_t>(rounded)) != 0) return fail("ftruncate");
  // Sealed: a node that maps the arena can rely on its size for as long as it holds the mapping.
  if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    return fail("F_ADD_SEALS");
  }
  void* p = mmap(nullptr, rounded, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return fail("mmap");
  madvise(p, rounded, MADV_HUGEPAGE);
  auto pool = MemoryPool::Over(static_cast<uint8_t*>(p), rounded);
  if (!pool.ok()) {
    munmap(p, rounded);
    ::close(fd);
    return pool.status();
  }
  return std::shared_ptr<StagingArena>(
      new StagingArena(fd, static_cast<uint8_t*>(p), rounded, std::move(pool.value())));
}

StagingArena::StagingArena(int fd, uint8_t* base, size_t bytes, std::unique_ptr<MemoryPool> pool)
    : fd_(fd), base_(base), bytes_(bytes), pool_(std::move(pool)) {}

StagingArena::~StagingArena() {
  pool_.reset();
  munmap(base_, bytes_);
  ::close(fd_);
}

MutableBuffer StagingArena::Take(size_t bytes) {
  if (bytes == 0) bytes = 1;  // a zero-length buffer still needs a distinct address to give back
  int64_t offset;
  size_t run;
  {
    std::lock_guard<std::mutex> lock(mu_);
    offset = pool_->Allocate(bytes);
    if (offset < 0) return {nullptr, 0};
    run = pool_->RunBytes(offset);
  }
  // Faulted in here, in the client: a node's first copy into the page would otherwise allocate
  // it, and charge it to the node's memory cgroup. Cheap once the pages exist.
  madvise(base_ + offset, run, kMadvPopulateWrite);
  return {base_ + offset, bytes};
}

void StagingArena::Give(const uint8_t* data) {
  const auto offset = Offset(data, 1);
  if (!offset) return;
  std::lock_guard<std::mutex> lock(mu_);
  pool_->Free(static_cast<int64_t>(*offset));
}

size_t StagingArena::used_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return pool_->used_bytes();
}

}  // namespace kvpool
