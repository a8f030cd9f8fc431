// Non-blocking socket helpers with deadlines: every wait is a poll() bounded by the caller's
// deadline.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "kvpool/deadline.h"
#include "kvpool/status.h"

namespace kvpool::net {

/// RAII file descriptor.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() { Reset(); }
  Fd(Fd&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      Reset();
      fd_ = o.fd_;
      o.fd_ = -1;
    }
    return *this;
  }
  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  /// Gives up ownership without closing.
  int Release() {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void Reset();

 private:
  int fd_ = -1;
};

void TuneDataSocket(int fd);  ///< TCP_NODELAY (the kernel's buffer autotuning is left alone)

/// Listens on host:port (port 0 = any free port). InvalidArgument for an unparsable host.
Result<Fd> Listen(const std::string& host, uint16_t port, int backlog);
uint16_t LocalPort(int fd);
/// Connects with a timeout; the socket comes back non-blocking and tuned.
Result<Fd> Connect(const std::string& host, uint16_t port, Deadline deadline);

/// Listens on a unix-domain stream socket at `path`. A stale socket file (nobody accepts on it)
/// is replaced; a live one is an error naming the path.
Result<Fd> ListenUnix(const std::string& path, int backlog);
/// Connects to a unix-domain stream socket; the socket comes back non-blocking.
Result<Fd> ConnectUnix(const std::string& path, Deadline deadline);
struct PeerCredentials {
  int pid = -1;
  uint32_t uid = ~0u, gid = ~0u;
};
/// SO_PEERCRED of a connected unix-domain socket.
Result<PeerCredentials> GetPeerCredentials(int fd);
/// Like SendAll, with `pass_fd` attached (SCM_RIGHTS) to the first byte.
Status SendAllWithFd(int fd, struct iovec* iov, size_t iovcnt, int pass_fd, Deadline deadline);
/// Like RecvAll on a unix-domain socket, keeping descriptors passed with the bytes (at most
/// `max_fds` are kept in `fds`; others are closed). `*received` counts every one that arrived.
Status RecvAllKeepFds(int fd, void* buf, size_t n, Deadline deadline, std::vector<Fd>* fds,
                      size_t max_fds, size_t* received);

/// Reads exactly `n` bytes. Closed on EOF, Timeout past the deadline, Connection on socket errors.
Status RecvAll(int fd, void* buf, size_t n, Deadline deadline);
/// Reads and drops `n` bytes through `scratch`.
Status Discard(int fd, size_t n, uint8_t* scratch, size_t scratch_bytes, Deadline deadline);
/// Writes every byte described by iov (modified in place as it is consumed).
Status SendAll(int fd, struct iovec* iov, size_t iovcnt, Deadline deadline);
Status SendAll(int fd, const void* buf, size_t n, Deadline deadline);
/// Reads at least one byte into `iov` (whatever is available); iov_len shrinks by the amount read.
Status RecvSome(int fd, struct iovec* iov, Deadline deadline);
/// Reads into several buffers until all are full (one readv per wake-up).
Status RecvAllV(int fd, struct iovec* iov, size_t iovcnt, Deadline deadline);

}  // namespace kvpool::net
