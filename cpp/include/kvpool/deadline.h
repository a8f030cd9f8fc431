// A point in time after which blocking I/O gives up: every wait on the data path is bounded by one.
#pragma once

#include <chrono>

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
  bool passed() const { return !never() && Clock::now() >= at_; }

 private:
  explicit Deadline(Clock::time_point at) : at_(at) {}
  Clock::time_point at_;
};

}  // namespace kvpool::net
