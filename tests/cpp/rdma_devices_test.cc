// RDMA device selection without a device: the device list "name[:gid_index],..." and link type
// parsers, GID helpers, the GPU -> device mapping (i*ndev/n), discovery over a fake sysfs tree
// written the way the kernel lays out /sys/class/infiniband, SelectDevice's rules over it, and
// OpenDevice's way from the options through selection to the libibverbs provider.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "kvpool/status.h"
#include "transport/rdma/devices.h"
#include "transport/rdma/verbs.h"

namespace kvpool::rdma {
namespace {

namespace fs = std::filesystem;

bool Contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}
bool Contains(const Status& s, const std::string& part) { return Contains(s.message(), part); }

// GIDs as sysfs prints them.
constexpr const char* kZeroGid = "0000:0000:0000:0000:0000:0000:0000:0000";
constexpr const char* kLinkLocalGid = "fe80:0000:0000:0000:0c42:a1ff:fe12:3456";
constexpr const char* kIpv4Gid = "0000:0000:0000:0000:0000:ffff:c0a8:0165";   // 192.168.1.101
constexpr const char* kIpv4Gid2 = "0000:0000:0000:0000:0000:ffff:0a00:0007";  // 10.0.0.7
constexpr const char* kRoceV1 = "IB/RoCE v1";
constexpr const char* kRoceV2 = "RoCE v2";

/// A sysfs-like tree under a fresh temp dir, removed at the end:
/// <root>/<dev>/device/numa_node, <root>/<dev>/ports/<n>/{state,link_layer,gids/<i>,
/// gid_attrs/types/<i>}.
class FakeSysfs {
 public:
  FakeSysfs() {
    std::string templ = (fs::temp_directory_path() / "kvpool-rdma-XXXXXX").string();
    const char* made = mkdtemp(templ.data());
    EXPECT_NE(made, nullptr);
    root_ = templ;
  }
  ~FakeSysfs() {
    std::error_code ec;
    fs::remove_all(root_, ec);
  }
  FakeSysfs(const FakeSysfs&) = delete;
  FakeSysfs& operator=(const FakeSysfs&) = delete;

  std::string root() const { return root_.string(); }

  /// A device; `numa` is written to device/numa_node when given ("1", "-1").
  void Device(const std::string& name, std::optional<std::string> numa = "-1") {
    fs::create_directories(root_ / name / "ports");
    if (numa) Write(root_ / name / "device" / "numa_node", *numa);
  }
  /// A port with its state ("4: ACTIVE", "1: DOWN") and link layer ("Ethernet", "InfiniBand").
  void Port(const std::string& dev, int n, const std::string& state, const std::string& link) {
    const fs::path p = PortDir(dev, n);
    fs::create_directories(p / "gids");
    fs::create_directories(p / "gid_attrs" / "types");
    Write(p / "state", state);
    Write(p / "link_layer", link);
  }
  /// A GID slot; `type` is written to gid_attrs/types/<i> when given.
  void Gid(const std::string& dev, int port, int index, const std::string& gid,
           std::optional<std::string> type) {
    const fs::path p = PortDir(dev, port);
    Write(p / "gids" / std::to_string(index), gid);
    if (type) Write(p / "gid_attrs" / "types" / std::to_string(index), *type);
  }

  /// A typical RoCE port: 0 link-local v1, 1 link-local v2, 2 IPv4 v1, 3 IPv4 v2, 4..5 unused.
  void RocePort(const std::string& dev, int n = 1, const std::string& state = "4: ACTIVE") {
    Port(dev, n, state, "Ethernet");
    Gid(dev, n, 0, kLinkLocalGid, kRoceV1);
    Gid(dev, n, 1, kLinkLocalGid, kRoceV2);
    Gid(dev, n, 2, kIpv4Gid, kRoceV1);
    Gid(dev, n, 3, kIpv4Gid, kRoceV2);
    Gid(dev, n, 4, kZeroGid, std::nullopt);
    Gid(dev, n, 5, kZeroGid, std::nullopt);
  }
  /// A typical IB port: GID 0 link-local, the rest unused.
  void IbPort(const std::string& dev, int n = 1, const std::string& state = "4: ACTIVE") {
    Port(dev, n, state, "InfiniBand");
    Gid(dev, n, 0, kLinkLocalGid, kRoceV1);
    Gid(dev, n, 1, kZeroGid, std::nullopt);
  }

 private:
  fs::path PortDir(const std::string& dev, int n) const {
    return root_ / dev / "ports" / std::to_string(n);
  }
  static void Write(const fs::path& path, const std::string& line) {
    fs::create_directories(path.parent_path());
    std::ofstream f(path);
    f << line << "\n";  // sysfs attributes end with a newline
    EXPECT_TRUE(f.good()) << path;
  }

  fs::path root_;
};

std::vector<DeviceRequest> List(const std::string& list) {
  auto r = ParseDeviceList(list);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return r.ok() ? r.value() : std::vector<DeviceRequest>{};
}

// ---- ParseDeviceList ----

// Rule: an empty string is no list (every device).
TEST(RdmaParseDeviceList, EmptyIsNoList) {
  auto r = ParseDeviceList("");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(r->empty());
  auto blank = ParseDeviceList("   ");
  ASSERT_TRUE(blank.ok()) << blank.status().ToString();
  EXPECT_TRUE(blank->empty());
}

// Rule: "mlx5_1" is one request without a GID index.
TEST(RdmaParseDeviceList, NameOnly) {
  const auto v = List("mlx5_1");
  ASSERT_EQ(v.size(), 1u);
  EXPECT_EQ(v[0].name, "mlx5_1");
  EXPECT_FALSE(v[0].gid_index.has_value());
}

// Rule: "mlx5_1:6,mlx5_2:7" keeps the order given and each entry's GID index.
TEST(RdmaParseDeviceList, SeedFormatKeepsOrderAndIndices) {
  const auto v = List("mlx5_2:7,mlx5_1:6");
  ASSERT_EQ(v.size(), 2u);
  EXPECT_EQ(v[0].name, "mlx5_2");
  EXPECT_EQ(v[0].gid_index, 7);
  EXPECT_EQ(v[1].name, "mlx5_1");
  EXPECT_EQ(v[1].gid_index, 6);

  const auto seed = List("mlx5_1:6,mlx5_2:7");
  ASSERT_EQ(seed.size(), 2u);
  EXPECT_EQ(seed[0].name, "mlx5_1");
  EXPECT_EQ(seed[0].gid_index, 6);
  EXPECT_EQ(seed[1].name, "mlx5_2");
  EXPECT_EQ(seed[1].gid_index, 7);
}

// Rule: indices 0 and 255 are the bounds of the valid range; entries may mix with/without index.
TEST(RdmaParseDeviceList, IndexBoundsAndMixedEntries) {
  const auto v = List("mlx5_0:0,mlx5_1,mlx5_2:255");
  ASSERT_EQ(v.size(), 3u);
  EXPECT_EQ(v[0].gid_index, 0);
  EXPECT_FALSE(v[1].gid_index.has_value());
  EXPECT_EQ(v[2].gid_index, 255);
}

// Rule: spaces around entries are ignored.
TEST(RdmaParseDeviceList, SpacesAroundEntries) {
  const auto v = List("  mlx5_1:6 ,\tmlx5_2  ");
  ASSERT_EQ(v.size(), 2u);
  EXPECT_EQ(v[0].name, "mlx5_1");
  EXPECT_EQ(v[0].gid_index, 6);
  EXPECT_EQ(v[1].name, "mlx5_2");
  EXPECT_FALSE(v[1].gid_index.has_value());
}

/// Expects InvalidArgument whose message contains every part.
void ExpectListError(const std::string& list, const std::vector<std::string>& parts) {
  auto r = ParseDeviceList(list);
  ASSERT_FALSE(r.ok()) << "'" << list << "' parsed";
  EXPECT_EQ(r.status().code(), ErrorCode::kInvalidArgument) << r.status().ToString();
  for (const std::string& part : parts) {
    EXPECT_TRUE(Contains(r.status(), part))
        << "'" << list << "': " << r.status().message() << " does not name '" << part << "'";
  }
}

// Rule: an empty entry is InvalidArgument naming the list.
TEST(RdmaParseDeviceList, EmptyEntryRefused) {
  ExpectListError("mlx5_1,,mlx5_2", {"mlx5_1,,mlx5_2", "empty entry"});
  ExpectListError("mlx5_1, ,mlx5_2", {"empty entry"});
}

// Rule: a trailing (or leading) comma leaves an empty entry.
TEST(RdmaParseDeviceList, TrailingCommaRefused) {
  ExpectListError("mlx5_1,", {"mlx5_1,", "empty entry"});
  ExpectListError(",mlx5_1", {"empty entry"});
}

// Rule: an entry without a name is not a device name.
TEST(RdmaParseDeviceList, MissingNameRefused) { ExpectListError(":3", {"':3'", "device name"}); }

// Rule: a bad device name (a space inside) is InvalidArgument naming it.
TEST(RdmaParseDeviceList, BadNameRefused) {
  ExpectListError("mlx5 1", {"'mlx5 1'", "device name"});
  ExpectListError("mlx5_0,mlx5/1", {"'mlx5/1'"});
}

// Rule: the GID index must be a number 0..255; the message names the entry and the index.
TEST(RdmaParseDeviceList, BadGidIndexRefused) {
  ExpectListError("mlx5_1:", {"'mlx5_1:'", "0..255"});
  ExpectListError("mlx5_1:x", {"'mlx5_1:x'", "'x'", "0..255"});
  ExpectListError("mlx5_1:-1", {"'mlx5_1:-1'", "'-1'"});
  ExpectListError("mlx5_1:256", {"'mlx5_1:256'", "'256'"});
  ExpectListError("mlx5_1:3x", {"'3x'"});
  ExpectListError("mlx5_1:3:4", {"'3:4'"});
  ExpectListError("mlx5_0:1,mlx5_1:99999999999", {"'mlx5_1:99999999999'"});
}

// Rule: a device listed twice is InvalidArgument naming it.
TEST(RdmaParseDeviceList, DuplicateRefused) {
  ExpectListError("mlx5_1:3,mlx5_1:4", {"'mlx5_1'", "twice"});
  ExpectListError("mlx5_1, mlx5_2, mlx5_1", {"'mlx5_1'", "twice"});
}

// ---- ParseLinkType / LinkTypeName ----

// Rule: "IB" / "InfiniBand" / "Ethernet" / "RoCE", any case.
TEST(RdmaParseLinkType, AcceptedNames) {
  for (const char* name : {"IB", "ib", "InfiniBand", "INFINIBAND", "infiniband"}) {
    auto r = ParseLinkType(name);
    ASSERT_TRUE(r.ok()) << name << ": " << r.status().ToString();
    EXPECT_EQ(r.value(), LinkType::kInfiniBand) << name;
  }
  for (const char* name : {"Ethernet", "ethernet", "ETHERNET", "RoCE", "roce"}) {
    auto r = ParseLinkType(name);
    ASSERT_TRUE(r.ok()) << name << ": " << r.status().ToString();
    EXPECT_EQ(r.value(), LinkType::kEthernet) << name;
  }
}

// Rule: anything else is InvalidArgument naming the value.
TEST(RdmaParseLinkType, UnknownRefusedNamingIt) {
  for (const char* name : {"ethernet2", "", "IBX", "tcp"}) {
    auto r = ParseLinkType(name);
    ASSERT_FALSE(r.ok()) << name;
    EXPECT_EQ(r.status().code(), ErrorCode::kInvalidArgument);
    EXPECT_TRUE(Contains(r.status(), "'" + std::string(name) + "'")) << r.status().message();
  }
}

// Rule: LinkTypeName gives "IB" and "Ethernet", which ParseLinkType reads back.
TEST(RdmaParseLinkType, NamesRoundTrip) {
  EXPECT_STREQ(LinkTypeName(LinkType::kInfiniBand), "IB");
  EXPECT_STREQ(LinkTypeName(LinkType::kEthernet), "Ethernet");
  for (LinkType t : {LinkType::kInfiniBand, LinkType::kEthernet}) {
    auto r = ParseLinkType(LinkTypeName(t));
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r.value(), t);
  }
}

// ---- GidEntry::ipv4 ----

// Rule: an IPv4-mapped GID (::ffff:a.b.c.d) gives a.b.c.d.
TEST(RdmaGidEntry, Ipv4Mapped) {
  GidEntry g;
  g.gid = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 168, 1, 101};
  EXPECT_EQ(g.ipv4(), "192.168.1.101");
  g.gid[12] = 10;
  g.gid[13] = 0;
  g.gid[14] = 0;
  g.gid[15] = 7;
  EXPECT_EQ(g.ipv4(), "10.0.0.7");
}

// Rule: anything not IPv4-mapped gives "" (a link-local fe80:: GID, all zero, ::ffff-less).
TEST(RdmaGidEntry, NotIpv4MappedIsEmpty) {
  GidEntry link_local;
  link_local.gid = {0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x0c, 0x42, 0xa1, 0xff, 0xfe, 0x12, 0x34, 0x56};
  EXPECT_EQ(link_local.ipv4(), "");
  GidEntry zero;
  EXPECT_EQ(zero.ipv4(), "");
  GidEntry compat;  // ::c0a8:0165 (IPv4-compatible, not mapped)
  compat.gid = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 192, 168, 1, 101};
  EXPECT_EQ(compat.ipv4(), "");
  GidEntry prefixed;  // fe80::ffff:c0a8:165 has the ffff but not the zero prefix
  prefixed.gid = {0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 168, 1, 101};
  EXPECT_EQ(prefixed.ipv4(), "");
}

// ---- DeviceForGpu ----

size_t Map(int gpu, int n, size_t ndev) {
  auto r = DeviceForGpu(gpu, n, ndev);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return r.ok() ? r.value() : static_cast<size_t>(-1);
}

// Rule: GPU i of n -> device i*ndev/n (the seed's formula).
TEST(RdmaDeviceForGpu, SeedFormula) {
  for (int gpu = 0; gpu < 8; ++gpu) {
    EXPECT_EQ(Map(gpu, 8, 2), gpu < 4 ? 0u : 1u) << "GPU " << gpu << " of 8 over 2";
    EXPECT_EQ(Map(gpu, 8, 8), static_cast<size_t>(gpu)) << "GPU " << gpu << " of 8 over 8";
    EXPECT_EQ(Map(gpu, 8, 1), 0u);
    EXPECT_EQ(Map(gpu, 8, 4), static_cast<size_t>(gpu / 2));
  }
  EXPECT_EQ(Map(0, 2, 4), 0u);
  EXPECT_EQ(Map(1, 2, 4), 2u);
  EXPECT_EQ(Map(0, 1, 3), 0u);
  EXPECT_EQ(Map(0, 3, 2), 0u);
  EXPECT_EQ(Map(1, 3, 2), 0u);
  EXPECT_EQ(Map(2, 3, 2), 1u);
  // Always a valid index.
  for (int n = 1; n <= 16; ++n) {
    for (size_t ndev = 1; ndev <= 9; ++ndev) {
      for (int gpu = 0; gpu < n; ++gpu) EXPECT_LT(Map(gpu, n, ndev), ndev);
    }
  }
}

// Rule: InvalidArgument when gpu is not in 0..num_gpus-1 (including num_gpus = 0).
TEST(RdmaDeviceForGpu, GpuOutOfRangeRefused) {
  for (auto [gpu, n] : std::vector<std::pair<int, int>>{{8, 8}, {-1, 8}, {0, 0}, {0, -1}}) {
    auto r = DeviceForGpu(gpu, n, 2);
    ASSERT_FALSE(r.ok()) << "GPU " << gpu << " of " << n;
    EXPECT_EQ(r.status().code(), ErrorCode::kInvalidArgument);
    EXPECT_TRUE(Contains(r.status(), "GPU " + std::to_string(gpu))) << r.status().message();
  }
}

// Rule: InvalidArgument when there is no device.
TEST(RdmaDeviceForGpu, NoDeviceRefused) {
  auto r = DeviceForGpu(0, 8, 0);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_TRUE(Contains(r.status(), "no RDMA device")) << r.status().message();
}

// ---- DiscoverDevices ----

// Rule: devices sorted by name, ports by number, GIDs by index with unused (all-zero) slots left
// out, roce_v2 from gid_attrs/types, numa_node from device/numa_node.
TEST(RdmaDiscoverDevices, ReadsTreeLikeTheKernelWritesIt) {
  FakeSysfs sys;
  sys.Device("mlx5_1", "1");
  sys.RocePort("mlx5_1", 2, "1: DOWN");
  sys.RocePort("mlx5_1", 1);
  sys.Device("mlx5_0", "-1");
  sys.IbPort("mlx5_0");
  sys.Device("mlx5_10", std::nullopt);  // no numa_node file
  sys.Port("mlx5_10", 1, "4: ACTIVE", "Ethernet");
  sys.Gid("mlx5_10", 1, 7, kIpv4Gid2, kRoceV2);
  sys.Gid("mlx5_10", 1, 2, kIpv4Gid, kRoceV2);
  sys.Gid("mlx5_10", 1, 3, "", std::nullopt);  // an unused RoCE slot reads EINVAL: empty here

  const std::vector<DeviceInfo> found = DiscoverDevices(sys.root());
  ASSERT_EQ(found.size(), 3u);
  EXPECT_EQ(found[0].name, "mlx5_0");
  EXPECT_EQ(found[1].name, "mlx5_1");
  EXPECT_EQ(found[2].name, "mlx5_10");

  // mlx5_0: IB, NUMA unknown, GID 0 only.
  EXPECT_EQ(found[0].numa_node, -1);
  ASSERT_EQ(found[0].ports.size(), 1u);
  const PortInfo& ib = found[0].ports[0];
  EXPECT_EQ(ib.number, 1);
  EXPECT_TRUE(ib.active);
  EXPECT_EQ(ib.link_layer, "InfiniBand");
  ASSERT_EQ(ib.gids.size(), 1u);
  EXPECT_EQ(ib.gids[0].index, 0);
  EXPECT_EQ(ib.gids[0].gid[0], 0xfe);
  EXPECT_EQ(ib.gids[0].gid[1], 0x80);
  EXPECT_EQ(ib.gids[0].gid[15], 0x56);

  // mlx5_1: NUMA 1, ports 1 (ACTIVE) and 2 (DOWN) in order, GIDs 0..3 with their types.
  EXPECT_EQ(found[1].numa_node, 1);
  ASSERT_EQ(found[1].ports.size(), 2u);
  EXPECT_EQ(found[1].ports[0].number, 1);
  EXPECT_TRUE(found[1].ports[0].active);
  EXPECT_EQ(found[1].ports[1].number, 2);
  EXPECT_FALSE(found[1].ports[1].active);
  for (const PortInfo& p : found[1].ports) {
    EXPECT_EQ(p.link_layer, "Ethernet");
    ASSERT_EQ(p.gids.size(), 4u) << "unused slots 4, 5 must be skipped";
    for (int i = 0; i < 4; ++i) EXPECT_EQ(p.gids[i].index, i);
    EXPECT_FALSE(p.gids[0].roce_v2);
    EXPECT_TRUE(p.gids[1].roce_v2);
    EXPECT_FALSE(p.gids[2].roce_v2);
    EXPECT_TRUE(p.gids[3].roce_v2);
    EXPECT_EQ(p.gids[0].ipv4(), "");
    EXPECT_EQ(p.gids[3].ipv4(), "192.168.1.101");
  }

  // mlx5_10: no numa_node file -> -1; GIDs sorted by index, the unreadable slot skipped.
  EXPECT_EQ(found[2].numa_node, -1);
  ASSERT_EQ(found[2].ports.size(), 1u);
  ASSERT_EQ(found[2].ports[0].gids.size(), 2u);
  EXPECT_EQ(found[2].ports[0].gids[0].index, 2);
  EXPECT_EQ(found[2].ports[0].gids[0].ipv4(), "192.168.1.101");
  EXPECT_EQ(found[2].ports[0].gids[1].index, 7);
  EXPECT_EQ(found[2].ports[0].gids[1].ipv4(), "10.0.0.7");
}

// Rule: a device without ports/ is still listed (with no port).
TEST(RdmaDiscoverDevices, DeviceWithoutPorts) {
  FakeSysfs sys;
  fs::create_directories(fs::path(sys.root()) / "rxe0");
  const auto found = DiscoverDevices(sys.root());
  ASSERT_EQ(found.size(), 1u);
  EXPECT_EQ(found[0].name, "rxe0");
  EXPECT_TRUE(found[0].ports.empty());
  EXPECT_EQ(found[0].numa_node, -1);
}

// Rule: empty when the directory does not exist (no RDMA on this machine).
TEST(RdmaDiscoverDevices, MissingRootIsEmpty) {
  FakeSysfs sys;
  EXPECT_TRUE(DiscoverDevices(sys.root() + "/nope").empty());
  EXPECT_TRUE(DiscoverDevices(sys.root()).empty());  // exists, but no device
}

// Rule: the default root is /sys/class/infiniband; where it is absent, nothing is found.
TEST(RdmaDiscoverDevices, DefaultRootAbsentIsEmpty) {
  if (fs::exists("/sys/class/infiniband")) {
    GTEST_SKIP() << "/sys/class/infiniband exists on this machine";
  }
  EXPECT_TRUE(DiscoverDevices().empty());
}

// ---- SelectDevice ----

Result<Selection> Select(const FakeSysfs& sys, const SelectionOptions& options) {
  return SelectDevice(DiscoverDevices(sys.root()), options);
}

void ExpectInvalid(const Result<Selection>& r, const std::vector<std::string>& parts) {
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kInvalidArgument) << r.status().ToString();
  for (const std::string& part : parts) {
    EXPECT_TRUE(Contains(r.status(), part))
        << r.status().message() << " does not name '" << part << "'";
  }
}

// Rule: no device found -> Unsupported (the caller falls back to TCP).
TEST(RdmaSelectDevice, NoDevicesIsUnsupported) {
  FakeSysfs sys;
  auto r = Select(sys, {});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kUnsupported);
  SelectionOptions listed;
  listed.devices = List("mlx5_0");
  auto r2 = SelectDevice({}, listed);
  ASSERT_FALSE(r2.ok());
  EXPECT_EQ(r2.status().code(), ErrorCode::kUnsupported);
}

// Rule: a listed device that is not on the machine is InvalidArgument naming it and the ones found.
TEST(RdmaSelectDevice, ListedDeviceMissing) {
  FakeSysfs sys;
  sys.Device("mlx5_0");
  sys.RocePort("mlx5_0");
  sys.Device("mlx5_1");
  sys.RocePort("mlx5_1");
  SelectionOptions o;
  o.devices = List("mlx5_0,mlx5_9:3");
  ExpectInvalid(Select(sys, o), {"'mlx5_9'", "mlx5_0, mlx5_1"});
}

// Rule: a port the device lacks is InvalidArgument naming device and port.
TEST(RdmaSelectDevice, PortMissing) {
  FakeSysfs sys;
  sys.Device("mlx5_0");
  sys.RocePort("mlx5_0");
  SelectionOptions o;
  o.port = 2;
  ExpectInvalid(Select(sys, o), {"'mlx5_0'", "port 2"});
}

// Rule: a port that is down is InvalidArgument naming it.
TEST(RdmaSelectDevice, PortDown) {
  FakeSysfs sys;
  sys.Device("mlx5_0");
  sys.RocePort("mlx5_0", 1, "1: DOWN");
  sys.RocePort("mlx5_0", 2);
  ExpectInvalid(Select(sys, {}), {"mlx5_0 port 1", "ACTIVE"});
  SelectionOptions o;
  o.port = 2;  // the other port is up
  auto r = Select(sys, o);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->port, 2);
}

// Rule: a link layer that differs from the link type is InvalidArgument (IB port, Ethernet link).
TEST(RdmaSelectDevice, IbPortWithEthernetLinkRefused) {
  FakeSysfs sys;
  sys.Device("mlx5_0");
  sys.IbPort("mlx5_0");
  SelectionOptions o;
  o.link = LinkType::kEthernet;
  ExpectInvalid(Select(sys, o), {"mlx5_0 port 1", "'InfiniBand'", "Ethernet"});
}

// Rule: ... and vice versa (Ethernet port, IB link).
TEST(RdmaSelectDevice, EthernetPortWithIbLinkRefused) {
  FakeSysfs sys;
  sys.Device("mlx5_0");
  sys.RocePort("mlx5_0");
  SelectionOptions o;
  o.link = LinkType::kInfiniBand;
  ExpectInvalid(Select(sys, o), {"mlx5_0 port 1", "'Ethernet'", "IB"});
}

// Rule: an explicit GID index is used as given (when it exists and, on Ethernet, is RoCE v2).
TEST(RdmaSelectDevice, ExplicitGidUsedAsGiven) {
  FakeSysfs sys;
  sys.Device("mlx5_0");
  sys.RocePort("mlx5_0");
  SelectionOptions o;
  o.devices = List("mlx5_0:1");  // link-local RoCE v2: not the default choice, but asked for
  auto r = Select(sys, o);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->device, "mlx5_0");
  EXPECT_EQ(r->gid_index, 1);
  EXPECT_TRUE(Contains(r->reason, "GID index 1")) << r->reason;
  EXPECT_TRUE(Contains(r->reason, "as listed")) << r->reason;
}

// Rule: an explicit GID index must exist (an unused slot does not count).
TEST(RdmaSelectDevice, ExplicitGidMissingRefused) {
  FakeSysfs sys;
  sys.Device("mlx5_0");
  sys.RocePort("mlx5_0");
  SelectionOptions o;
  o.devices = List("mlx5_0:4");  // an all-zero slot
  ExpectInvalid(Select(sys, o), {"mlx5_0 port 1", "GID index 4"});
  o.devices = List("mlx5_0:200");
  ExpectInvalid(Select(sys, o), {"GID index 200"});
}

// Rule: on Ethernet an explicit GID index must be RoCE v2.
TEST(RdmaSelectDevice, ExplicitNonRoceV2GidOnEthernetRefused) {
  FakeSysfs sys;
  sys.Device("mlx5_0");
  sys.RocePort("mlx5_0");
  SelectionOptions o;
  o.devices = List("mlx5_0:2");  // IPv4, but RoCE v1
  ExpectInvalid(Select(sys, o), {"mlx5_0 port 1", "GID index 2", "RoCE v2"});
}

// Rule: on IB an explicit GID index need only exist (GID types do not apply).
TEST(RdmaSelectDevice, ExplicitGidOnIb) {
  FakeSysfs sys;
  sys.Device("mlx5_0");
  sys.IbPort("mlx5_0");
  SelectionOptions o;
  o.link = LinkType::kInfiniBand;
  o.devices = List("mlx5_0:0");
  auto r = Select(sys, o);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->gid_index, 0);
  o.devices = List("mlx5_0:1");  // unused
  ExpectInvalid(Select(sys, o), {"GID index 1"});
}

// Rule: Ethernet without an index picks the first RoCE v2 GID of an IPv4 address; the reason
// names the index and the IP.
TEST(RdmaSelectDevice, EthernetPicksFirstRoceV2Ipv4Gid) {
  FakeSysfs sys;
  sys.Device("mlx5_0");
  sys.RocePort("mlx5_0");
  sys.Gid("mlx5_0", 1, 6, kIpv4Gid2, kRoceV2);  // a later RoCE v2 IPv4 GID: not the first
  auto r = Select(sys, {});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->device, "mlx5_0");
  EXPECT_EQ(r->port, 1);
  EXPECT_EQ(r->gid_index, 3);
  EXPECT_EQ(r->link, LinkType::kEthernet);
  EXPECT_TRUE(Contains(r->reason, "GID index 3")) << r->reason;
  EXPECT_TRUE(Contains(r->reason, "192.168.1.101")) << r->reason;
  EXPECT_TRUE(Contains(r->reason, "mlx5_0")) << r->reason;
}

// Rule: Ethernet without an index and no RoCE v2 IPv4 GID is InvalidArgument that says how to fix
// it (device:N).
TEST(RdmaSelectDevice, EthernetWithoutRoceV2Ipv4GidRefused) {
  FakeSysfs sys;
  sys.Device("mlx5_0");
  sys.Port("mlx5_0", 1, "4: ACTIVE", "Ethernet");
  sys.Gid("mlx5_0", 1, 0, kLinkLocalGid, kRoceV1);
  sys.Gid("mlx5_0", 1, 1, kLinkLocalGid, kRoceV2);
  sys.Gid("mlx5_0", 1, 2, kIpv4Gid, kRoceV1);
  ExpectInvalid(Select(sys, {}), {"mlx5_0 port 1", "RoCE v2", "mlx5_0:N"});
}

// Rule: IB without an index picks 0 (LID routing).
TEST(RdmaSelectDevice, IbPicksGidZero) {
  FakeSysfs sys;
  sys.Device("mlx5_0");
  sys.IbPort("mlx5_0");
  SelectionOptions o;
  o.link = LinkType::kInfiniBand;
  auto r = Select(sys, o);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->device, "mlx5_0");
  EXPECT_EQ(r->gid_index, 0);
  EXPECT_EQ(r->link, LinkType::kInfiniBand);
  EXPECT_TRUE(Contains(r->reason, "GID index 0")) << r->reason;
  EXPECT_TRUE(Contains(r->reason, "IB")) << r->reason;
}

// Rule: without a GPU, the first listed device (list order, not name order); with no list, the
// first by name.
TEST(RdmaSelectDevice, NoGpuTakesFirstListed) {
  FakeSysfs sys;
  for (const char* d : {"mlx5_0", "mlx5_1", "mlx5_2"}) {
    sys.Device(d);
    sys.RocePort(d);
  }
  auto all = Select(sys, {});
  ASSERT_TRUE(all.ok()) << all.status().ToString();
  EXPECT_EQ(all->device, "mlx5_0");
  SelectionOptions o;
  o.devices = List("mlx5_2,mlx5_0");
  auto r = Select(sys, o);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->device, "mlx5_2");
  EXPECT_TRUE(Contains(r->reason, "first listed")) << r->reason;
}

// Rule: GPU i of n maps over the listed devices in list order (i*ndev/n), each with its own GID
// index; the reason names the GPU.
TEST(RdmaSelectDevice, GpuMapsOverListInListOrder) {
  FakeSysfs sys;
  for (const char* d : {"mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3"}) {
    sys.Device(d);
    sys.RocePort(d);
  }
  SelectionOptions o;
  o.devices = List("mlx5_3:1,mlx5_1:3");
  o.num_gpus = 4;
  const char* want[] = {"mlx5_3", "mlx5_3", "mlx5_1", "mlx5_1"};
  for (int gpu = 0; gpu < 4; ++gpu) {
    o.gpu = gpu;
    auto r = Select(sys, o);
    ASSERT_TRUE(r.ok()) << "GPU " << gpu << ": " << r.status().ToString();
    EXPECT_EQ(r->device, want[gpu]) << "GPU " << gpu;
    EXPECT_EQ(r->gid_index, gpu < 2 ? 1 : 3) << "GPU " << gpu;
    EXPECT_TRUE(Contains(r->reason, "GPU " + std::to_string(gpu) + " of 4")) << r->reason;
  }
}

// Rule: with no list, GPU i of n maps over every device by name: 8 GPUs over 2 -> 0-3, 4-7.
TEST(RdmaSelectDevice, GpuMapsOverAllDevices) {
  FakeSysfs sys;
  for (const char* d : {"mlx5_1", "mlx5_0"}) {
    sys.Device(d);
    sys.RocePort(d);
  }
  SelectionOptions o;
  o.num_gpus = 8;
  for (int gpu = 0; gpu < 8; ++gpu) {
    o.gpu = gpu;
    auto r = Select(sys, o);
    ASSERT_TRUE(r.ok()) << "GPU " << gpu << ": " << r.status().ToString();
    EXPECT_EQ(r->device, gpu < 4 ? "mlx5_0" : "mlx5_1") << "GPU " << gpu;
  }
}

// Rule: a GPU outside 0..num_gpus-1 is InvalidArgument naming it.
TEST(RdmaSelectDevice, GpuOutOfRangeRefused) {
  FakeSysfs sys;
  sys.Device("mlx5_0");
  sys.RocePort("mlx5_0");
  SelectionOptions o;
  o.gpu = 2;
  o.num_gpus = 2;
  ExpectInvalid(Select(sys, o), {"GPU 2"});
  o.num_gpus = 0;
  o.gpu = 0;
  ExpectInvalid(Select(sys, o), {"GPU 0"});
}

// Rule: the GPU's NUMA node, when some candidates are on it, narrows the choice to them (and the
// reason says so).
TEST(RdmaSelectDevice, NumaPreferenceNarrowsChoice) {
  FakeSysfs sys;
  sys.Device("mlx5_0", "0");
  sys.RocePort("mlx5_0");
  sys.Device("mlx5_1", "1");
  sys.RocePort("mlx5_1");
  sys.Device("mlx5_2", "0");
  sys.RocePort("mlx5_2");
  SelectionOptions o;
  o.num_gpus = 2;
  o.gpu = 0;  // plain mapping: mlx5_0 (numa 0)
  o.gpu_numa = 1;
  auto r = Select(sys, o);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->device, "mlx5_1");
  EXPECT_TRUE(Contains(r->reason, "GPU 0 of 2")) << r->reason;
  EXPECT_TRUE(Contains(r->reason, "NUMA node 1")) << r->reason;

  // On NUMA 0 the pool is {mlx5_0, mlx5_2}: GPU 1 of 2 -> the second of them.
  o.gpu = 1;
  o.gpu_numa = 0;
  auto r2 = Select(sys, o);
  ASSERT_TRUE(r2.ok()) << r2.status().ToString();
  EXPECT_EQ(r2->device, "mlx5_2");
  EXPECT_TRUE(Contains(r2->reason, "NUMA node 0")) << r2->reason;
}

// Rule: the NUMA preference applies within the listed devices only.
TEST(RdmaSelectDevice, NumaPreferenceWithinList) {
  FakeSysfs sys;
  sys.Device("mlx5_0", "1");
  sys.RocePort("mlx5_0");
  sys.Device("mlx5_1", "0");
  sys.RocePort("mlx5_1");
  sys.Device("mlx5_2", "1");
  sys.RocePort("mlx5_2");
  SelectionOptions o;
  o.devices = List("mlx5_1,mlx5_2:1");  // mlx5_0 (numa 1) is not listed
  o.num_gpus = 1;
  o.gpu = 0;
  o.gpu_numa = 1;
  auto r = Select(sys, o);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->device, "mlx5_2");
  EXPECT_EQ(r->gid_index, 1);  // the listed index travels with the device
}

// Rule: a NUMA node no candidate is on (or unknown, -1) leaves the plain mapping over all.
TEST(RdmaSelectDevice, NumaNoMatchIsPlainMapping) {
  FakeSysfs sys;
  sys.Device("mlx5_0", "0");
  sys.RocePort("mlx5_0");
  sys.Device("mlx5_1", "-1");
  sys.RocePort("mlx5_1");
  SelectionOptions o;
  o.num_gpus = 2;
  for (int numa : {3, -1}) {
    o.gpu_numa = numa;
    for (int gpu = 0; gpu < 2; ++gpu) {
      o.gpu = gpu;
      auto r = Select(sys, o);
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      EXPECT_EQ(r->device, gpu == 0 ? "mlx5_0" : "mlx5_1") << "GPU " << gpu << " numa " << numa;
      EXPECT_FALSE(Contains(r->reason, "NUMA")) << r->reason;
      EXPECT_TRUE(Contains(r->reason, "GPU " + std::to_string(gpu) + " of 2")) << r->reason;
    }
  }
}

// Rule (header: "GPU i of n uses device i*ndev/n, preferring devices on the GPU's NUMA node"):
// on the common 8-GPU / 4-NIC / 2-socket host (GPUs 0-3 and NICs 0-1 on node 0, GPUs 4-7 and
// NICs 2-3 on node 1) the plain mapping 0,0,1,1,2,2,3,3 is already NUMA-local, so preferring local
// devices must not change it, and every NIC stays in use.
TEST(RdmaSelectDevice, NumaPreferenceKeepsAllLocalDevicesInUse) {
  FakeSysfs sys;
  for (int i = 0; i < 4; ++i) {
    const std::string d = "mlx5_" + std::to_string(i);
    sys.Device(d, i < 2 ? "0" : "1");
    sys.RocePort(d);
  }
  SelectionOptions o;
  o.num_gpus = 8;
  for (int gpu = 0; gpu < 8; ++gpu) {
    o.gpu = gpu;
    o.gpu_numa = gpu < 4 ? 0 : 1;
    auto r = Select(sys, o);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->device, "mlx5_" + std::to_string(gpu / 2)) << "GPU " << gpu << ": " << r->reason;
  }
}

// ---- ValidateRdmaOptions / OpenDevice ----

/// KVPOOL_RDMA_PROVIDER set (or unset) for one test.
class ProviderEnv {
 public:
  explicit ProviderEnv(const char* value) {
    if (const char* old = std::getenv("KVPOOL_RDMA_PROVIDER")) old_ = old;
    if (value != nullptr) {
      setenv("KVPOOL_RDMA_PROVIDER", value, 1);
    } else {
      unsetenv("KVPOOL_RDMA_PROVIDER");
    }
  }
  ~ProviderEnv() {
    if (old_) {
      setenv("KVPOOL_RDMA_PROVIDER", old_->c_str(), 1);
    } else {
      unsetenv("KVPOOL_RDMA_PROVIDER");
    }
  }

 private:
  std::optional<std::string> old_;
};

// Rule: every bad setting is refused by name before any device is looked at.
TEST(RdmaValidateOptions, NamesTheBadSetting) {
  EXPECT_TRUE(ValidateRdmaOptions(RdmaOptions{}).ok());
  RdmaOptions o;
  o.devices = "mlx5_1:6,,mlx5_2";
  EXPECT_TRUE(Contains(ValidateRdmaOptions(o), "empty entry"));
  o = {};
  o.link_type = "fddi";
  EXPECT_TRUE(Contains(ValidateRdmaOptions(o), "fddi"));
  o = {};
  o.port = 0;
  EXPECT_TRUE(Contains(ValidateRdmaOptions(o), "port 0"));
  o = {};
  o.gpu = 2;  // bound to a GPU, but how many are there?
  EXPECT_EQ(ValidateRdmaOptions(o).code(), ErrorCode::kInvalidArgument);
  o.num_gpus = 2;
  EXPECT_TRUE(Contains(ValidateRdmaOptions(o), "2"));
  o.num_gpus = 4;
  EXPECT_TRUE(ValidateRdmaOptions(o).ok());
  o.gpu = -2;
  EXPECT_TRUE(Contains(ValidateRdmaOptions(o), "-2"));
}

// Rule: no device is Unsupported (the caller serves or uses TCP), saying so.
TEST(RdmaOpenDevice, NoDeviceIsUnsupported) {
  ProviderEnv env(nullptr);
  FakeSysfs empty;
  auto r = OpenDevice(RdmaOptions{}, empty.root() + "/absent");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kUnsupported);
  EXPECT_TRUE(Contains(r.status(), "no RDMA devices")) << r.status().ToString();
}

// Rule: a device that sysfs lists is handed to the libibverbs provider; here libibverbs has no
// such device (no kernel RDMA), and the answer is Unsupported naming it, never a crash.
TEST(RdmaOpenDevice, SelectedDeviceGoesToLibibverbs) {
  ProviderEnv env("ibverbs");
  FakeSysfs sys;
  sys.Device("mlx5_0");
  sys.RocePort("mlx5_0");
  RdmaOptions o;
  o.devices = "mlx5_0:3";
  auto r = OpenDevice(o, sys.root());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kUnsupported) << r.status().ToString();
  EXPECT_TRUE(Contains(r.status(), "mlx5_0")) << r.status().ToString();
}

// Rule: a listed device this machine lacks is InvalidArgument naming it (a misconfiguration).
TEST(RdmaOpenDevice, ListedDeviceMissingNamesIt) {
  ProviderEnv env(nullptr);
  FakeSysfs sys;
  sys.Device("mlx5_0");
  sys.RocePort("mlx5_0");
  RdmaOptions o;
  o.devices = "mlx5_9";
  auto r = OpenDevice(o, sys.root());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_TRUE(Contains(r.status(), "mlx5_9") && Contains(r.status(), "mlx5_0"))
      << r.status().ToString();
}

// Rule: an unknown provider is named; the software provider opens with any valid selection
// but still refuses an invalid one.
TEST(RdmaOpenDevice, Providers) {
  {
    ProviderEnv env("bogus");
    auto r = OpenDevice(RdmaOptions{});
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), ErrorCode::kUnsupported);
    EXPECT_TRUE(Contains(r.status(), "'bogus'")) << r.status().ToString();
  }
  ProviderEnv env("soft");
  RdmaOptions o;
  o.devices = "mlx5_1:6,mlx5_2:7";
  auto soft = OpenDevice(o);
  ASSERT_TRUE(soft.ok()) << soft.status().ToString();
  EXPECT_TRUE(soft.value()->software());
  o.devices = "mlx5_1:300";
  EXPECT_EQ(OpenDevice(o).status().code(), ErrorCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvpool::rdma
