#include "support/socket.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>

namespace kvpool::net {
namespace {

Status Errno(const char* what) {
  return Status(ErrorCode::kConnection, std::string(what) + ": " + std::strerror(errno));
}

/// Waits until fd is ready for `events`; Timeout once the deadline passes.
Status Wait(int fd, short events, Deadline deadline) {
  while (true) {
    pollfd p{fd, events, 0};
    const int r = poll(&p, 1, deadline.PollTimeoutMs());
    if (r > 0) return Status::Ok();  // errors and hang-ups surface from the next recv/send
    if (r == 0) return Status(ErrorCode::kTimeout, "socket I/O deadline exceeded");
    if (errno != EINTR) return Errno("poll");
  }
}

Result<sockaddr_in> Resolve(const std::string& host, uint16_t port) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  const std::string h = host == "localhost" ? "127.0.0.1" : host;
  if (inet_pton(AF_INET, h.c_str(), &addr.sin_addr) == 1) return addr;
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(h.c_str(), nullptr, &hints, &res) != 0 || res == nullptr) {
    return Status(ErrorCode::kInvalidArgument, "cannot resolve host '" + host + "'");
  }
  addr.sin_addr = reinterpret_cast<sockaddr_in*>(res->ai_addr)->sin_addr;
  freeaddrinfo(res);
  return addr;
}

/// Drops fully written or read iovecs and trims the first partial one.
void Advance(struct iovec*& iov, size_t& iovcnt, size_t n) {
  while (iovcnt > 0 && n >= iov->iov_len) {
    n -= iov->iov_len;
    ++iov;
    --iovcnt;
  }
  if (iovcnt > 0 && n > 0) {
    iov->iov_base = static_cast<uint8_t*>(iov->iov_base) + n;
    iov->iov_len -= n;
  }
}

}  // namespace

int Deadline::PollTimeoutMs() const {
  if (never()) return -1;
  const auto left =
      std::chrono::duration_cast<std::chrono::milliseconds>(at_ - Clock::now()).count();
  if (left <= 0) return 0;
  return static_cast<int>(std::min<int64_t>(left, INT_MAX));
}

void Fd::Reset() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

void TuneDataSocket(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

Result<Fd> Listen(const std::string& host, uint16_t port, int backlog) {
  auto addr = Resolve(host, port);
  if (!addr.ok()) return addr.status();
  Fd fd(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return Errno("socket");
  int one = 1;
  setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(fd.get(), reinterpret_cast<sockaddr*>(&addr.value()), sizeof(sockaddr_in)) != 0) {
    return Status(ErrorCode::kConnection,
                  "bind " + host + ":" + std::to_string(port) + ": " + std::strerror(errno));
  }
  if (listen(fd.get(), backlog) != 0) return Errno("listen");
  return fd;
}

uint16_t LocalPort(int fd) {
  sockaddr_in addr{};
  socklen_t len = sizeof addr;
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  return ntohs(addr.sin_port);
}

Result<Fd> Connect(const std::string& host, uint16_t port, Deadline deadline) {
  auto addr = Resolve(host, port);
  if (!addr.ok()) return addr.status();
  Fd fd(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd.valid()) return Errno("socket");
  TuneDataSocket(fd.get());
  const std::string where = host + ":" + std::to_string(port);
  if (connect(fd.get(), reinterpret_cast<sockaddr*>(&addr.value()), sizeof(sockaddr_in)) != 0) {
    if (errno != EINPROGRESS) {
      return Status(ErrorCode::kConnection, "connect " + where + ": " + std::strerror(errno));
    }
    Status s = Wait(fd.get(), POLLOUT, deadline);
    if (!s.ok()) return Status(s.code(), "connect " + where + ": timed out");
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0)
      return Status(ErrorCode::kConnection, "connect " + where + ": " + std::strerror(err));
  }
  return fd;
}

namespace {

Result<sockaddr_un> UnixAddress(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof addr.sun_path) {
    return Status(ErrorCode::kInvalidArgument, "unix socket path '" + path + "' must be 1 to " +
                                                   std::to_string(sizeof addr.sun_path - 1) +
                                                   " bytes long");
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  return addr;
}

}  // namespace

Result<Fd> ListenUnix(const std::string& path, int backlog) {
  auto addr = UnixAddress(path);
  if (!addr.ok()) return addr.status();
  struct stat st{};
  if (lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return Status(ErrorCode::kConnection,
                    "unix socket path '" + path + "' exists and is not a socket");
    }
    Fd probe(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (probe.valid() && connect(probe.get(), reinterpret_cast<sockaddr*>(&addr.value()),
                                 sizeof(sockaddr_un)) == 0) {
      return Status(ErrorCode::kConnection,
                    "unix socket '" + path + "' is in use by another process");
    }
    unlink(path.c_str());  // left behind by a process that died
  }
  Fd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return Errno("socket");
  if (bind(fd.get(), reinterpret_cast<sockaddr*>(&addr.value()), sizeof(sockaddr_un)) != 0) {
    return Status(ErrorCode::kConnection, "bind " + path + ": " + std::strerror(errno));
  }
  if (listen(fd.get(), backlog) != 0) return Errno("listen");
  return fd;
}

Result<Fd> ConnectUnix(const std::string& path, Deadline deadline) {
  auto addr = UnixAddress(path);
  if (!addr.ok()) return addr.status();
  Fd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd.valid()) return Errno("socket");
  // A unix-domain connect never completes later: EAGAIN means the listener's backlog is full
  // and nothing was connected, so try again until the deadline.
  while (connect(fd.get(), reinterpret_cast<sockaddr*>(&addr.value()), sizeof(sockaddr_un)) != 0) {
    if (errno == EINTR) continue;
    if (errno != EAGAIN) {
      return Status(ErrorCode::kConnection, "connect " + path + ": " + std::strerror(errno));
    }
    if (deadline.PollTimeoutMs() == 0) {
      return Status(ErrorCode::kTimeout, "connect " + path + ": backlog full until the deadline");
    }
    poll(nullptr, 0, 1);
  }
  return fd;
}

Result<PeerCredentials> GetPeerCredentials(int fd) {
  ucred cred{};
  socklen_t len = sizeof cred;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return Errno("SO_PEERCRED");
  return PeerCredentials{cred.pid, cred.uid, cred.gid};
}

Status SendAllWithFd(int fd, struct iovec* iov, size_t iovcnt, int pass_fd, Deadline deadline) {
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  while (true) {
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = std::min<size_t>(iovcnt, IOV_MAX);
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(c), &pass_fd, sizeof(int));
    const ssize_t n = sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (n >= 0) {
      Advance(iov, iovcnt, static_cast<size_t>(n));
      return SendAll(fd, iov, iovcnt, deadline);  // the descriptor went with the first bytes
    }
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      KVPOOL_RETURN_IF_ERROR(Wait(fd, POLLOUT, deadline));
    } else if (errno != EINTR) {
      return Errno("sendmsg");
    }
  }
}

Status RecvAllKeepFds(int fd, void* buf, size_t n, Deadline deadline, std::vector<Fd>* fds,
                      size_t max_fds, size_t* received) {
  auto* p = static_cast<uint8_t*>(buf);
  while (n > 0) {
    alignas(cmsghdr) char control[CMSG_SPACE(4 * sizeof(int))];
    iovec iov{p, n};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    const ssize_t got = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
    if (got > 0) {
      for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; ++i) {
          int passed;
          std::memcpy(&passed, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
          Fd owned(passed);
          ++*received;
          if (fds->size() < max_fds) fds->push_back(std::move(owned));
        }
      }
      p += got;
      n -= static_cast<size_t>(got);
    } else if (got == 0) {
      return Status(ErrorCode::kClosed, "connection closed by peer");
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
      KVPOOL_RETURN_IF_ERROR(Wait(fd, POLLIN, deadline));
    } else if (errno != EINTR) {
      return Errno("recvmsg");
    }
  }
  return Status::Ok();
}

Status RecvAllV(int fd, struct iovec* iov, size_t iovcnt, Deadline deadline) {
  Advance(iov, iovcnt, 0);  // a zero-length read must not be mistaken for the peer's EOF
  while (iovcnt > 0) {
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = std::min<size_t>(iovcnt, IOV_MAX);
    const ssize_t n = recvmsg(fd, &msg, 0);
    if (n > 0) {
      Advance(iov, iovcnt, static_cast<size_t>(n));
    } else if (n == 0) {
      return Status(ErrorCode::kClosed, "connection closed by peer");
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
      KVPOOL_RETURN_IF_ERROR(Wait(fd, POLLIN, deadline));
    } else if (errno != EINTR) {
      return Errno("recv");
    }
  }
  return Status::Ok();
}

Status RecvSome(int fd, struct iovec* iov, Deadline deadline) {
  while (true) {
    const ssize_t n = recv(fd, iov->iov_base, iov->iov_len, 0);
    if (n > 0) {
      iov->iov_len -= static_cast<size_t>(n);
      return Status::Ok();
    }
    if (n == 0) return Status(ErrorCode::kClosed, "connection closed by peer");
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      KVPOOL_RETURN_IF_ERROR(Wait(fd, POLLIN, deadline));
    } else if (errno != EINTR) {
      return Errno("recv");
    }
  }
}

Status RecvAll(int fd, void* buf, size_t n, Deadline deadline) {
  iovec iov{buf, n};
  return RecvAllV(fd, &iov, 1, deadline);
}

Status Discard(int fd, size_t n, uint8_t* scratch, size_t scratch_bytes, Deadline deadline) {
  while (n > 0) {
    const size_t chunk = std::min(n, scratch_bytes);
    KVPOOL_RETURN_IF_ERROR(RecvAll(fd, scratch, chunk, deadline));
    n -= chunk;
  }
  return Status::Ok();
}

Status SendAll(int fd, struct iovec* iov, size_t iovcnt, Deadline deadline) {
  Advance(iov, iovcnt, 0);
  while (iovcnt > 0) {
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = std::min<size_t>(iovcnt, IOV_MAX);
    const ssize_t n = sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (n >= 0) {
      Advance(iov, iovcnt, static_cast<size_t>(n));
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
      KVPOOL_RETURN_IF_ERROR(Wait(fd, POLLOUT, deadline));
    } else if (errno != EINTR) {
      return Errno("send");
    }
  }
  return Status::Ok();
}

Status SendAll(int fd, const void* buf, size_t n, Deadline deadline) {
  iovec iov{const_cast<void*>(buf), n};
  return SendAll(fd, &iov, 1, deadline);
}

}  // namespace kvpool::net
