#include "support/log.h"

#include <cstdio>
#include <mutex>

#include "kvpool/logging.h"

namespace kvpool::log {

std::atomic<int> g_threshold{kWarning};

void Emit(int level, std::string_view line) {
  const char* name = level >= kError     ? "error"
                     : level >= kWarning ? "warning"
                     : level >= kInfo    ? "info"
                                         : "debug";
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  std::fprintf(stderr, "kvpool.core level=%s %.*s\n", name, static_cast<int>(line.size()),
               line.data());
}

}  // namespace kvpool::log

namespace kvpool {

void SetLogThreshold(int level) { log::g_threshold.store(level); }

}  // namespace kvpool
