#include "kvpool/redis_index.h"

#include <charconv>
#include <chrono>
#include <cstring>

#include "support/socket.h"

namespace kvpool {
namespace {

void AppendBulk(std::string* out, const void* data, size_t n) {
  out->push_back('$');
  out->append(std::to_string(n));
  out->append("\r\n");
  out->append(static_cast<const char*>(data), n);
  out->append("\r\n");
}
void AppendBulk(std::string* out, const std::string& s) { AppendBulk(out, s.data(), s.size()); }
void AppendArrayHeader(std::string* out, size_t n) {
  out->push_back('*');
  out->append(std::to_string(n));
  out->append("\r\n");
}

}  // namespace

/// A RESP2 connection with a read buffer; just enough of the protocol for the index reads.
class RedisIndexReader::Conn {
 public:
  Conn(net::Fd fd, net::Deadline deadline) : fd_(std::move(fd)), deadline_(deadline) {}

  void set_deadline(net::Deadline d) { deadline_ = d; }
  Status Send(const std::string& data) {
    return net::SendAll(fd_.get(), data.data(), data.size(), deadline_);
  }

  /// Reads one line (without CRLF) into `line`.
  Status ReadLine(std::string_view* line) {
    while (true) {
      const size_t end = buf_.find("\r\n", pos_);
      if (end != std::string::npos) {
        *line = std::string_view(buf_).substr(pos_, end - pos_);
        pos_ = end + 2;
        return Status::Ok();
      }
      KVPOOL_RETURN_IF_ERROR(Fill());
    }
  }

  /// Reads `n` bytes plus CRLF of a bulk string.
  Status ReadBulkBody(size_t n, std::string* out) {
    while (buf_.size() - pos_ < n + 2) KVPOOL_RETURN_IF_ERROR(Fill());
    out->assign(buf_, pos_, n);
    pos_ += n + 2;
    return Status::Ok();
  }

  /// Reads a reply header: its type byte and the number after it (errors become Status).
  Status ReadHeader(char* type, int64_t* value) {
    std::string_view line;
    KVPOOL_RETURN_IF_ERROR(ReadLine(&line));
    if (line.empty()) return Status(ErrorCode::kProtocol, "empty Redis reply line");
    *type = line[0];
    if (*type == '-') return Status(ErrorCode::kInternal, "redis: " + std::string(line.substr(1)));
    if (*type == '+') {
      *value = 0;
      return Status::Ok();
    }
    const auto r = std::from_chars(line.data() + 1, line.data() + line.size(), *value);
    if (r.ec != std::errc())
      return Status(ErrorCode::kProtocol, "bad Redis reply: " + std::string(line));
    return Status::Ok();
  }

  Status ExpectOk() {
    char type;
    int64_t v;
    return ReadHeader(&type, &v);
  }

 private:
  Status Fill() {
    if (pos_ > 0 && pos_ == buf_.size()) {
      buf_.clear();
      pos_ = 0;
    } else if (pos_ > (1 << 20)) {
      buf_.erase(0, pos_);
      pos_ = 0;
    }
    const size_t old = buf_.size();
    buf_.resize(old + 64 * 1024);
    iovec iov{buf_.data() + old, 64 * 1024};
    // Read whatever is available (at least one byte) without waiting for the full 64 KiB.
    Status s = net::RecvSome(fd_.get(), &iov, deadline_);
    buf_.resize(old + (s.ok() ? 64 * 1024 - iov.iov_len : 0));
    return s;
  }

  net::Fd fd_;
  net::Deadline deadline_;
  std::string buf_;
  size_t pos_ = 0;
};

RedisIndexReader::RedisIndexReader(RedisEndpoint endpoint, std::string meta_key,
                                   std::vector<std::string> partition_keys, uint32_t timeout_ms)
    : endpoint_(std::move(endpoint)),
      meta_key_(std::move(meta_key)),
      partition_keys_(std::move(partition_keys)),
      timeout_ms_(timeout_ms),
      by_partition_(partition_keys_.size()) {}

RedisIndexReader::~RedisIndexReader() = default;

Status RedisIndexReader::EnsureConnected() {
  if (conn_) return Status::Ok();
  const auto deadline = net::Deadline::In(std::chrono::milliseconds(timeout_ms_));
  auto fd = net::Connect(endpoint_.host, endpoint_.port, deadline);
  if (!fd.ok()) return fd.status();
  auto conn = std::make_unique<Conn>(std::move(fd.value()), deadline);
  std::string hello;
  size_t replies = 0;
  if (!endpoint_.password.empty()) {
    const bool user = !endpoint_.username.empty();
    AppendArrayHeader(&hello, user ? 3 : 2);
    AppendBulk(&hello, std::string("AUTH"));
    if (user) AppendBulk(&hello, endpoint_.username);
    AppendBulk(&hello, endpoint_.password);
    ++replies;
  }
  if (endpoint_.db != 0) {
    AppendArrayHeader(&hello, 2);
    AppendBulk(&hello, std::string("SELECT"));
    AppendBulk(&hello, std::to_string(endpoint_.db));
    ++replies;
  }
  if (replies > 0) {
    KVPOOL_RETURN_IF_ERROR(conn->Send(hello));
    for (size_t i = 0; i < replies; ++i) KVPOOL_RETURN_IF_ERROR(conn->ExpectOk());
  }
  conn_ = std::move(conn);
  return Status::Ok();
}

Status RedisIndexReader::Lookup(std::span<const Key128> keys, int64_t* epoch,
                                std::vector<std::string>* holders) {
  std::lock_guard<std::mutex> lock(mu_);
  holders->assign(keys.size(), std::string());
  const size_t parts = partition_keys_.size();
  for (auto& v : by_partition_) v.clear();
  for (uint32_t i = 0; i < keys.size(); ++i) {
    const unsigned p = ((unsigned{keys[i].bytes[0]} << 8) | keys[i].bytes[1]) % parts;
    by_partition_[p].push_back(i);
  }
  // Plain HGET/HMGET on the library's own layout (redis_scripts/00_common.lua): the same data
  // kvpool_epoch and kvpool_lookup return, without a Lua call per partition on the server.
  request_.clear();
  AppendArrayHeader(&request_, 3);
  AppendBulk(&request_, std::string("HGET"));
  AppendBulk(&request_, meta_key_);
  AppendBulk(&request_, std::string("epoch"));
  for (size_t p = 0; p < parts; ++p) {
    const auto& idx = by_partition_[p];
    if (idx.empty()) continue;
    AppendArrayHeader(&request_, 2 + idx.size());
    AppendBulk(&request_, std::string("HMGET"));
    AppendBulk(&request_, partition_keys_[p]);
    for (uint32_t i : idx) AppendBulk(&request_, keys[i].bytes.data(), keys[i].bytes.size());
  }
  Status s = EnsureConnected();
  if (s.ok()) {
    conn_->set_deadline(net::Deadline::In(std::chrono::milliseconds(timeout_ms_)));
    s = conn_->Send(request_);
  }
  char type;
  int64_t len = 0;
  *epoch = 0;
  if (s.ok()) s = conn_->ReadHeader(&type, &len);
  if (s.ok() && type != '$') s = Status(ErrorCode::kProtocol, "the epoch is not a string");
  if (s.ok() && len >= 0) {  // nil: no member ever joined
    std::string text;
    s = conn_->ReadBulkBody(static_cast<size_t>(len), &text);
    if (s.ok() &&
        std::from_chars(text.data(), text.data() + text.size(), *epoch).ec != std::errc()) {
      s = Status(ErrorCode::kProtocol, "the epoch '" + text + "' is not an integer");
    }
  }
  // Replies come in request order: one array per partition call.
  for (size_t p = 0; p < parts && s.ok(); ++p) {
    const auto& idx = by_partition_[p];
    if (idx.empty()) continue;
    int64_t n = 0;
    s = conn_->ReadHeader(&type, &n);
    if (s.ok() && (type != '*' || n != static_cast<int64_t>(idx.size()))) {
      s = Status(ErrorCode::kProtocol, "HMGET reply does not match its keys");
    }
    for (size_t j = 0; j < idx.size() && s.ok(); ++j) {
      int64_t len = 0;
      s = conn_->ReadHeader(&type, &len);
      if (!s.ok() || len < 0) continue;  // nil: not published
      if (type != '$') {
        s = Status(ErrorCode::kProtocol, "HMGET reply element is not a string");
        break;
      }
      s = conn_->ReadBulkBody(static_cast<size_t>(len), &(*holders)[idx[j]]);
    }
  }
  // Any failure may leave unread replies behind: start the next call on a fresh connection.
  if (!s.ok()) conn_.reset();
  return s;
}

Status RedisIndexReader::Locate(std::span<const Key128> keys, std::span<const std::string> live,
                                int64_t* epoch, std::vector<int32_t>* holder) {
  std::vector<std::string> holders;  // per call: concurrent calls must not share it
  KVPOOL_RETURN_IF_ERROR(Lookup(keys, epoch, &holders));
  holder->assign(keys.size(), -1);
  for (size_t i = 0; i < keys.size(); ++i) {
    std::string_view list = holders[i];
    while (!list.empty() && (*holder)[i] < 0) {
      const size_t comma = list.find(',');
      const std::string_view entry = list.substr(0, comma);
      for (size_t j = 0; j < live.size(); ++j) {
        if (live[j] == entry) {
          (*holder)[i] = static_cast<int32_t>(j);
          break;
        }
      }
      list = comma == std::string_view::npos ? std::string_view() : list.substr(comma + 1);
    }
  }
  return Status::Ok();
}

}  // namespace kvpool
