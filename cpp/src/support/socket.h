// Non-blocking socket helpers with deadlines: every wait is a poll() bounded by the caller's
// deadline.
#pragma once

#include <sys/uio.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>

#include "kvpool/status.h"

namespace kvpool::net {

using Clock = std::chrono::steady_clock;

/// A point in time after which I/O gives up with Timeout; Never() waits forever.
class Deadline {
 public:
  static Deadline Never() { return Deadline(Clock::time_point::max()); }
  static Deadline In(std::chrono::milliseconds ms) { return Deadline(Clock::now() + ms); }
  /// Milliseconds left for poll(): -1 for never, 0 once passed.
  int PollTimeoutMs() const;
  bool never() const { return at_ == Clock::time_point::max(); }

 private:
  explicit Deadline(Clock::time_point at) : at_(at) {}
  Clock::time_point at_;
};

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
