#include "transport/shm/shm_link.h"

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>

namespace kvpool {

Result<std::unique_ptr<ShmLink>> ShmLink::Open(int fd, int memfd, uint64_t bytes) {
  if (bytes == 0) return Status(ErrorCode::kInvalidArgument, "shared-memory arena of 0 bytes");
  const int seals = fcntl(memfd, F_GET_SEALS);
  if (seals < 0 || (seals & F_SEAL_SHRINK) == 0) {
    return Status(ErrorCode::kInvalidArgument,
                  "the passed arena is not a memfd sealed with F_SEAL_SHRINK (a file that can "
                  "shrink under the node's mapping is refused)");
  }
  struct statfs fs{};
  if (fstatfs(memfd, &fs) != 0 || fs.f_type == HUGETLBFS_MAGIC) {
    // A hugetlbfs page that cannot be allocated on first touch faults (SIGBUS) instead of failing.
    return Status(ErrorCode::kInvalidArgument, "hugetlbfs arenas are refused; pass a tmpfs memfd");
  }
  struct stat st{};
  if (fstat(memfd, &st) != 0 || static_cast<uint64_t>(st.st_size) < bytes) {
    return Status(ErrorCode::kInvalidArgument,
                  "the passed arena holds " + std::to_string(st.st_size) + " bytes, the offer " +
                      "claims " + std::to_string(bytes));
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
  if (p == MAP_FAILED) {
    return Status(ErrorCode::kInvalidArgument, "cannot map the passed arena of " +
                                                   std::to_string(bytes) +
                                                   " bytes: " + std::strerror(errno));
  }
  return std::unique_ptr<ShmLink>(new ShmLink(fd, static_cast<uint8_t*>(p), bytes));
}

ShmLink::~ShmLink() { munmap(base_, bytes_); }

Status ShmLink::CheckRuns(std::span<const PeerBuffer> runs) {
  return CheckRunsInRegion(runs, bytes_, sorted_);
}

Status ShmLink::ReadPeer(std::span<const PeerBuffer> from, std::span<const MutableBuffer> into) {
  for (size_t i = 0; i < from.size(); ++i) {
    if (!from[i].described() || into[i].data == nullptr) continue;
    if (from[i].addr > bytes_ || from[i].size > bytes_ - from[i].addr) {
      return Status(ErrorCode::kInternal, "entry " + std::to_string(i) + " was not checked");
    }
    // CheckRuns validated from[i]; the destination is the block's reservation of that length.
    if (into[i].size != from[i].size) {
      return Status(ErrorCode::kInternal, "entry " + std::to_string(i) + ": reservation of " +
                                              std::to_string(into[i].size) +
                                              " bytes for a run of " +
                                              std::to_string(from[i].size));
    }
    std::memcpy(into[i].data, base_ + from[i].addr, from[i].size);
  }
  return Status::Ok();
}

Status ShmLink::WritePeer(std::span<const ConstBuffer> blocks, std::span<const PeerBuffer> to) {
  for (size_t i = 0; i < blocks.size(); ++i) {
    if (blocks[i].data != nullptr && i < to.size() && DeliveredInPeer(to[i], blocks[i].size)) {
      if (to[i].addr > bytes_ || to[i].size > bytes_ - to[i].addr) {
        return Status(ErrorCode::kInternal, "entry " + std::to_string(i) + " was not checked");
      }
      std::memcpy(base_ + to[i].addr, blocks[i].data, blocks[i].size);
    }
  }
  return Status::Ok();
}

const std::string& LocalHostId() {
  static const std::string id = [] {
    std::ifstream f("/proc/sys/kernel/random/boot_id");
    std::string s;
    if (f && std::getline(f, s) && !s.empty()) return s;
    char host[256] = {};
    gethostname(host, sizeof host - 1);
    return std::string(host);
  }();
  return id;
}

}  // namespace kvpool
