// The CUDA copy engine's paths that run without a GPU: unavailable with its reason, and bad
// regions refused before the runtime is asked. Copies on a device: tests/python/test_gpu.py.
#include <gtest/gtest.h>

#include "kvpool/copy_engine.h"

namespace kvpool {
namespace {

TEST(CudaCopyEngine, WithoutADeviceItIsUnsupportedWithTheReason) {
  const Status available = CudaAvailable();
  if (available.ok()) GTEST_SKIP() << "a CUDA device is here: tests/python/test_gpu.py copies";
  EXPECT_EQ(available.code(), ErrorCode::kUnsupported);
  EXPECT_FALSE(available.message().empty());
  auto engine = MakeCudaCopyEngine({{0x1000, 512, 512, 8}});
  ASSERT_FALSE(engine.ok());
  EXPECT_EQ(engine.status().code(), ErrorCode::kUnsupported);
  EXPECT_EQ(engine.status().message(), available.message());
  EXPECT_EQ(CudaHostRegister(0x1000, 4096).code(), ErrorCode::kUnsupported);
}

TEST(CudaCopyEngine, BadRegionsAreRefusedFirst) {
  auto none = MakeCudaCopyEngine({});
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().code(), ErrorCode::kInvalidArgument);
  auto overlapping = MakeCudaCopyEngine({{0x1000, 256, 512, 8}});
  ASSERT_FALSE(overlapping.ok());
  EXPECT_EQ(overlapping.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(overlapping.status().message().find("exceed stride"), std::string::npos);
}

}  // namespace
}  // namespace kvpool
