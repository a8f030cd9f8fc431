#include "kvpool/status.h"

namespace kvpool {

const char* ErrorCodeName(ErrorCode code) {
  switch (code) {
    case ErrorCode::kOk:
      return "Ok";
    case ErrorCode::kInvalidArgument:
      return "InvalidArgument";
    case ErrorCode::kInternal:
      return "Internal";
    case ErrorCode::kUnsupported:
      return "Unsupported";
    case ErrorCode::kNoSpace:
      return "NoSpace";
    case ErrorCode::kNotFound:
      return "NotFound";
    case ErrorCode::kTooLarge:
      return "TooLarge";
    case ErrorCode::kConnection:
      return "Connection";
    case ErrorCode::kTimeout:
      return "Timeout";
    case ErrorCode::kClosed:
      return "Closed";
    case ErrorCode::kProtocol:
      return "Protocol";
    case ErrorCode::kBadMagic:
      return "BadMagic";
    case ErrorCode::kBadVersion:
      return "BadVersion";
    case ErrorCode::kFrameTooLarge:
      return "FrameTooLarge";
    case ErrorCode::kBatchTooLarge:
      return "BatchTooLarge";
    case ErrorCode::kUnknownOp:
      return "UnknownOp";
    case ErrorCode::kBadFrame:
      return "BadFrame";
    case ErrorCode::kHandshakeRequired:
      return "HandshakeRequired";
    case ErrorCode::kUnauthorized:
      return "Unauthorized";
  }
  return "Unknown";
}

std::string Status::ToString() const {
  if (ok()) return "Ok";
  return std::string(ErrorCodeName(code_)) + ": " + message_;
}

}  // namespace kvpool
