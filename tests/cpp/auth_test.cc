// SHA-256 and HMAC-SHA256 against the published test vectors (FIPS 180-4 examples, RFC 4231),
// streamed in odd pieces too, and the challenge-response helpers' properties.
#include "support/auth.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "support/sha256.h"

namespace kvpool {
namespace {

std::string Hex(const crypto::Digest& d) {
  static const char* kDigits = "0123456789abcdef";
  std::string out;
  for (uint8_t b : d) {
    out += kDigits[b >> 4];
    out += kDigits[b & 15];
  }
  return out;
}

std::string Sha(const std::string& s) {
  crypto::Sha256 h;
  h.Update(s);
  return Hex(h.Finish());
}

TEST(Sha256, FipsVectors) {
  EXPECT_EQ(Sha(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(Sha("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(Sha("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(Sha(std::string(1000000, 'a')),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

// Rule: the digest does not depend on how the message is cut into Update calls (block
// boundaries, the 55/56/64-byte padding edges).
TEST(Sha256, StreamingEqualsOneShot) {
  for (size_t n : {0, 1, 55, 56, 57, 63, 64, 65, 127, 128, 1000}) {
    std::string msg;
    for (size_t i = 0; i < n; ++i) msg += static_cast<char>('a' + i % 26);
    for (size_t piece : {1, 3, 63, 64, 65}) {
      crypto::Sha256 h;
      for (size_t at = 0; at < n; at += piece) h.Update(std::string_view(msg).substr(at, piece));
      EXPECT_EQ(Hex(h.Finish()), Sha(msg)) << n << " in pieces of " << piece;
    }
  }
}

TEST(HmacSha256, Rfc4231Vectors) {
  EXPECT_EQ(Hex(crypto::HmacSha256(std::string(20, '\x0b'), "Hi There")),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
  EXPECT_EQ(Hex(crypto::HmacSha256("Jefe", "what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
  // A key longer than the block is hashed first.
  EXPECT_EQ(Hex(crypto::HmacSha256(std::string(131, '\xaa'),
                                   "Test Using Larger Than Block-Size Key - Hash Key First")),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
}

TEST(Auth, ConstantTimeEqual) {
  EXPECT_TRUE(crypto::ConstantTimeEqual("", ""));
  EXPECT_TRUE(crypto::ConstantTimeEqual("abc", "abc"));
  EXPECT_FALSE(crypto::ConstantTimeEqual("abc", "abd"));
  EXPECT_FALSE(crypto::ConstantTimeEqual("abc", "ab"));
}

TEST(Auth, NoncesDiffer) {
  const std::string a = auth::RandomNonce(), b = auth::RandomNonce();
  EXPECT_EQ(a.size(), auth::kNonceBytes);
  EXPECT_NE(a, b);
}

// Rule: a proof binds the token, the role and both nonces and the node id: change any and it
// no longer matches; with several tokens (rotation), the matching one is found.
TEST(Auth, ProofsBindEverything) {
  const std::string cn(16, 'c'), nn(16, 'n'), id(16, 'i');
  const std::string p = auth::Proof("secret", "client", cn, nn, id);
  EXPECT_EQ(p.size(), auth::kProofBytes);
  EXPECT_NE(p, auth::Proof("secreT", "client", cn, nn, id));
  EXPECT_NE(p, auth::Proof("secret", "node", cn, nn, id));
  EXPECT_NE(p, auth::Proof("secret", "client", nn, cn, id));
  EXPECT_NE(p, auth::Proof("secret", "client", cn, std::string(16, 'm'), id));
  EXPECT_NE(p, auth::Proof("secret", "client", cn, nn, std::string(16, 'j')));
  const std::vector<std::string> tokens = {"old", "secret"};
  EXPECT_EQ(auth::MatchClientProof(tokens, p, cn, nn, id), 1);
  EXPECT_EQ(auth::MatchClientProof(std::vector<std::string>{"old"}, p, cn, nn, id), -1);
  EXPECT_EQ(auth::MatchClientProof(tokens, auth::Proof("secret", "node", cn, nn, id), cn, nn, id),
            -1);
}

}  // namespace
}  // namespace kvpool
