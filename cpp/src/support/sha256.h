// SHA-256 (FIPS 180-4) and HMAC-SHA256 (RFC 2104), for the data plane's challenge-response: small,
// dependency-free, and checked against the published test vectors (tests/cpp/auth_test.cc).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace kvpool::crypto {

using Digest = std::array<uint8_t, 32>;

class Sha256 {
 public:
  Sha256();
  void Update(std::string_view bytes);
  Digest Finish();

 private:
  void Block(const uint8_t* p);

  std::array<uint32_t, 8> h_;
  std::array<uint8_t, 64> buf_{};
  size_t buffered_ = 0;
  uint64_t total_ = 0;
};

Digest HmacSha256(std::string_view key, std::string_view message);

/// Equal without an early exit, so the time taken says nothing about where they differ.
bool ConstantTimeEqual(std::string_view a, std::string_view b);

}  // namespace kvpool::crypto
