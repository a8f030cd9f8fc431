// Data-plane authentication (docs/protocol.md, "Authentication"): a challenge-response over
// nonces from both sides, so a token never crosses the wire and a captured handshake proves
// nothing on a later connection. Both sides prove the token: the client to be served, the node so
// that a client never hands its arena or its blocks to an impostor.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

namespace kvpool::auth {

inline constexpr uint8_t kHmacSha256 = 1;  ///< the one method (first byte of HELLO ext 1)
inline constexpr size_t kNonceBytes = 16;
inline constexpr size_t kExtBytes = 1 + kNonceBytes;  ///< ext 1: u8 method, nonce
inline constexpr size_t kProofBytes = 32;

/// kNonceBytes from the kernel's CSPRNG (getrandom).
std::string RandomNonce();

/// HMAC-SHA256(token, "kvpool-auth-v1 " + role + client_nonce + node_nonce + node_id), role being
/// "client" (sent in AUTH) or "node" (the AUTH reply).
std::string Proof(std::string_view token, std::string_view role, std::string_view client_nonce,
                  std::string_view node_nonce, std::string_view node_id);

/// The index of the token in `tokens` whose client proof equals `proof` (every token is tried,
/// in constant time each), or -1.
int MatchClientProof(std::span<const std::string> tokens, std::string_view proof,
                     std::string_view client_nonce, std::string_view node_nonce,
                     std::string_view node_id);

}  // namespace kvpool::auth
