// The core's one logging facility: a line of key=value context on stderr, filtered by level.
#pragma once

#include <atomic>
#include <sstream>
#include <string_view>

namespace kvpool::log {

enum Level : int { kDebug = 10, kInfo = 20, kWarning = 30, kError = 40 };

/// Messages below this level are dropped; the extension defaults to warnings and above.
extern std::atomic<int> g_threshold;

void Emit(int level, std::string_view line);

inline void AppendPairs(std::ostringstream&) {}
template <typename K, typename V, typename... Rest>
void AppendPairs(std::ostringstream& os, const K& key, const V& value, const Rest&... rest) {
  os << ' ' << key << '=' << value;
  AppendPairs(os, rest...);
}

template <typename... KV>
void Log(int level, std::string_view message, const KV&... kv) {
  std::ostringstream os;
  os << "msg=\"" << message << '"';
  AppendPairs(os, kv...);
  Emit(level, os.str());
}

}  // namespace kvpool::log

#define KVPOOL_LOG(level, ...)                                                              \
  do {                                                                                      \
    if (::kvpool::log::level >= ::kvpool::log::g_threshold.load(std::memory_order_relaxed)) \
      ::kvpool::log::Log(::kvpool::log::level, __VA_ARGS__);                                \
  } while (0)
