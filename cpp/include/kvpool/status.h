// Error codes and the Status / Result types every kvpool API returns.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <variant>

namespace kvpool {

/// Error codes, grouped by area. The numeric values are part of the wire protocol (they travel in
/// error replies) and of the Python exception mapping: never renumber, only append.
enum class ErrorCode : int32_t {
  kOk = 0,
  // General (1xx).
  kInvalidArgument = 100,
  kInternal = 101,
  kUnsupported = 102,
  // Storage (2xx).
  kNoSpace = 200,
  kNotFound = 201,
  kTooLarge = 202,
  // Network (3xx).
  kConnection = 300,
  kTimeout = 301,
  kClosed = 302,
  // Protocol (4xx).
  kProtocol = 400,
  kBadMagic = 401,
  kBadVersion = 402,
  kFrameTooLarge = 403,
  kBatchTooLarge = 404,
  kUnknownOp = 405,
  kBadFrame = 406,
  kHandshakeRequired = 407,
  kUnauthorized = 408,
};

/// Short stable name of an error code ("NoSpace", "Timeout", ...).
const char* ErrorCodeName(ErrorCode code);

/// The outcome of an operation: kOk, or an error code with a message naming the bad value.
class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(ErrorCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return Status(); }

  bool ok() const { return code_ == ErrorCode::kOk; }
  ErrorCode code() const { return code_; }
  const std::string& message() const { return message_; }
  /// "Timeout: recv from 127.0.0.1:7000 exceeded 1000 ms".
  std::string ToString() const;

 private:
  ErrorCode code_ = ErrorCode::kOk;
  std::string message_;
};

/// A value or the Status explaining why there is none.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : data_(std::move(value)) {}         // NOLINT(google-explicit-constructor)
  Result(Status status) : data_(std::move(status)) {}  // NOLINT(google-explicit-constructor)

  bool ok() const { return std::holds_alternative<T>(data_); }
  const Status& status() const {
    static const Status kOkStatus;
    return ok() ? kOkStatus : std::get<Status>(data_);
  }
  T& value() { return std::get<T>(data_); }
  const T& value() const { return std::get<T>(data_); }
  T& operator*() { return value(); }
  T* operator->() { return &value(); }

 private:
  std::variant<T, Status> data_;
};

}  // namespace kvpool

/// Returns early from the enclosing function when `expr` yields a non-ok Status.
#define KVPOOL_RETURN_IF_ERROR(expr)                 \
  do {                                               \
    ::kvpool::Status kvpool_status_ = (expr);        \
    if (!kvpool_status_.ok()) return kvpool_status_; \
  } while (0)
