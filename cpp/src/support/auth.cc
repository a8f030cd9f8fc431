#include "support/auth.h"

#include <sys/random.h>

#include <cerrno>
#include <random>

#include "support/sha256.h"

namespace kvpool::auth {

std::string RandomNonce() {
  std::string nonce(kNonceBytes, '\0');
  size_t got = 0;
  while (got < nonce.size()) {
    const ssize_t n = getrandom(nonce.data() + got, nonce.size() - got, 0);
    if (n > 0) {
      got += static_cast<size_t>(n);
    } else if (errno != EINTR) {
      break;
    }
  }
  if (got < nonce.size()) {  // no getrandom (very old kernel): the libc source of entropy
    std::random_device rd;
    for (char& c : nonce) c = static_cast<char>(rd());
  }
  return nonce;
}

std::string Proof(std::string_view token, std::string_view role, std::string_view client_nonce,
                  std::string_view node_nonce, std::string_view node_id) {
  std::string message = "kvpool-auth-v1 ";
  message += role;
  message += client_nonce;
  message += node_nonce;
  message += node_id;
  const crypto::Digest d = crypto::HmacSha256(token, message);
  return std::string(reinterpret_cast<const char*>(d.data()), d.size());
}

int MatchClientProof(std::span<const std::string> tokens, std::string_view proof,
                     std::string_view client_nonce, std::string_view node_nonce,
                     std::string_view node_id) {
  int match = -1;
  for (size_t i = 0; i < tokens.size(); ++i) {
    const std::string expected = Proof(tokens[i], "client", client_nonce, node_nonce, node_id);
    if (crypto::ConstantTimeEqual(expected, proof) && match < 0) match = static_cast<int>(i);
  }
  return match;
}

}  // namespace kvpool::auth
