// RDMA device selection, as the seed configures it: a device list "name[:gid_index],...", a link
// type (IB: LID routing; Ethernet: RoCE v2 with a GRH on the chosen GID), a port, and the GPU ->
// device mapping (GPU i of n uses device i*ndev/n, preferring devices on the GPU's NUMA node).
// Discovery reads sysfs (/sys/class/infiniband), which also has what verbs does not: the GID
// types. Pure logic over what it read, so every rule is tested without a device.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "kvpool/status.h"

namespace kvpool::rdma {

/// One entry of a device list: "mlx5_1" or "mlx5_1:6".
struct DeviceRequest {
  std::string name;
  std::optional<int> gid_index;
};

/// "mlx5_1:6,mlx5_2:7" -> requests in order. Empty string: no list (all devices). InvalidArgument
/// naming the bad entry for an empty entry, a bad name, a GID index that is not 0..255, or a
/// device listed twice.
Result<std::vector<DeviceRequest>> ParseDeviceList(std::string_view list);

enum class LinkType { kInfiniBand, kEthernet };
/// "IB" / "InfiniBand" or "Ethernet" / "RoCE" (any case); InvalidArgument naming the value.
Result<LinkType> ParseLinkType(std::string_view name);
const char* LinkTypeName(LinkType type);  ///< "IB", "Ethernet"

struct GidEntry {
  int index = 0;
  std::array<uint8_t, 16> gid{};
  bool roce_v2 = false;  ///< sysfs gid_attrs/types says "RoCE v2"
  /// The IPv4 address of an IPv4-mapped GID (::ffff:a.b.c.d), else empty.
  std::string ipv4() const;
};

struct PortInfo {
  int number = 1;
  bool active = false;         ///< sysfs state "4: ACTIVE"
  std::string link_layer;      ///< "InfiniBand" or "Ethernet"
  std::vector<GidEntry> gids;  ///< populated entries only (all-zero GIDs are unused slots)
};

struct DeviceInfo {
  std::string name;
  int numa_node = -1;  ///< sysfs device/numa_node; -1 when unknown
  std::vector<PortInfo> ports;
};

/// The devices under `root` (default /sys/class/infiniband), sorted by name; empty when the
/// directory does not exist (no RDMA on this machine) or cannot be read.
std::vector<DeviceInfo> DiscoverDevices(const std::string& root = "/sys/class/infiniband");

/// GPU `gpu` of `num_gpus` -> index into `num_devices` devices (the seed's i*ndev/n).
/// InvalidArgument when gpu is not in 0..num_gpus-1 or there is no device.
Result<size_t> DeviceForGpu(int gpu, int num_gpus, size_t num_devices);

/// The GID index to use on `port`: `requested` when given (it must exist), else on Ethernet the
/// first RoCE v2 GID of an IPv4 address, on IB index 0. `why` says which and why.
Result<int> ChooseGid(const DeviceInfo& device, const PortInfo& port, LinkType link,
                      std::optional<int> requested, std::string* why);

struct SelectionOptions {
  std::vector<DeviceRequest> devices;  ///< empty: every discovered device
  LinkType link = LinkType::kEthernet;
  int port = 1;
  int gpu = -1;       ///< -1: no GPU binding (the first listed device)
  int num_gpus = 0;   ///< GPUs on this host (for the i*ndev/n mapping)
  int gpu_numa = -1;  ///< the GPU's NUMA node when known: devices there are preferred
};

struct Selection {
  std::string device;
  int port = 1;
  int gid_index = 0;
  LinkType link = LinkType::kEthernet;
  std::string reason;  ///< one line for the log: what was chosen and why
};

/// Chooses device, port and GID. Unsupported when no device is found (the caller falls back to
/// TCP); InvalidArgument naming the device, port or GID for a request that cannot be met (a listed
/// device that does not exist, a port it lacks, a port that is down, a link layer that differs
/// from the link type, a GID index it does not have).
Result<Selection> SelectDevice(const std::vector<DeviceInfo>& found,
                               const SelectionOptions& options);

}  // namespace kvpool::rdma
