#include "transport/rdma/devices.h"

#include <arpa/inet.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <filesystem>
#include <fstream>

namespace kvpool::rdma {
namespace {

namespace fs = std::filesystem;

Status Invalid(std::string message) {
  return Status(ErrorCode::kInvalidArgument, std::move(message));
}

std::string Lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

std::string Trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return std::string(s);
}

std::string ReadLine(const fs::path& path) {
  std::ifstream f(path);
  std::string line;
  if (f) std::getline(f, line);
  return Trim(line);
}

/// "fe80:0000:0000:0000:0000:ffff:c0a8:0101" -> 16 bytes; nullopt for anything else.
std::optional<std::array<uint8_t, 16>> ParseGid(const std::string& text) {
  std::array<uint8_t, 16> gid{};
  size_t at = 0;
  for (int group = 0; group < 8; ++group) {
    if (group > 0) {
      if (at >= text.size() || text[at] != ':') return std::nullopt;
      ++at;
    }
    if (text.size() - at < 4) return std::nullopt;
    unsigned value = 0;
    auto [end, ec] = std::from_chars(text.data() + at, text.data() + at + 4, value, 16);
    if (ec != std::errc() || end != text.data() + at + 4) return std::nullopt;
    gid[group * 2] = static_cast<uint8_t>(value >> 8);
    gid[group * 2 + 1] = static_cast<uint8_t>(value & 0xff);
    at += 4;
  }
  if (at != text.size()) return std::nullopt;
  return gid;
}

/// The whole of `text` as a decimal int.
bool ParseInt(const std::string& text, int* out) {
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), *out);
  return !text.empty() && ec == std::errc() && end == text.data() + text.size();
}

bool ValidName(std::string_view name) {
  return !name.empty() && std::all_of(name.begin(), name.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.';
  });
}

std::string DescribeDevices(const std::vector<DeviceInfo>& found) {
  std::string out;
  for (const DeviceInfo& d : found) out += (out.empty() ? "" : ", ") + d.name;
  return out.empty() ? "none" : out;
}

}  // namespace

Result<std::vector<DeviceRequest>> ParseDeviceList(std::string_view list) {
  std::vector<DeviceRequest> out;
  if (Trim(list).empty()) return out;
  size_t start = 0;
  while (start <= list.size()) {
    const size_t comma = std::min(list.find(',', start), list.size());
    const std::string entry = Trim(list.substr(start, comma - start));
    start = comma + 1;
    if (entry.empty()) {
      return Invalid("device list '" + std::string(list) + "' has an empty entry");
    }
    DeviceRequest r;
    const size_t colon = entry.find(':');
    r.name = Trim(entry.substr(0, colon));
    if (!ValidName(r.name)) {
      return Invalid("device list entry '" + entry + "': '" + r.name + "' is not a device name");
    }
    if (colon != std::string::npos) {
      const std::string index = Trim(entry.substr(colon + 1));
      int value = -1;
      auto [end, ec] = std::from_chars(index.data(), index.data() + index.size(), value);
      if (index.empty() || ec != std::errc() || end != index.data() + index.size() || value < 0 ||
          value > 255) {
        return Invalid("device list entry '" + entry + "': GID index '" + index +
                       "' is not a number 0..255");
      }
      r.gid_index = value;
    }
    for (const DeviceRequest& seen : out) {
      if (seen.name == r.name) return Invalid("device '" + r.name + "' is listed twice");
    }
    out.push_back(std::move(r));
    if (comma == list.size()) break;
  }
  return out;
}

Result<LinkType> ParseLinkType(std::string_view name) {
  const std::string n = Lower(Trim(name));
  if (n == "ib" || n == "infiniband") return LinkType::kInfiniBand;
  if (n == "ethernet" || n == "roce" || n == "eth") return LinkType::kEthernet;
  return Invalid("link type must be 'IB' or 'Ethernet', got '" + std::string(name) + "'");
}

const char* LinkTypeName(LinkType type) {
  return type == LinkType::kInfiniBand ? "IB" : "Ethernet";
}

std::string GidEntry::ipv4() const {
  for (int i = 0; i < 10; ++i) {
    if (gid[i] != 0) return "";
  }
  if (gid[10] != 0xff || gid[11] != 0xff) return "";
  char buf[INET_ADDRSTRLEN] = {};
  inet_ntop(AF_INET, gid.data() + 12, buf, sizeof buf);
  return buf;
}

std::vector<DeviceInfo> DiscoverDevices(const std::string& root) {
  std::vector<DeviceInfo> out;
  std::error_code ec;
  for (const auto& dev : fs::directory_iterator(root, ec)) {
    DeviceInfo d;
    d.name = dev.path().filename().string();
    const std::string numa = ReadLine(dev.path() / "device" / "numa_node");
    if (!numa.empty()) {
      int value = -1;
      std::from_chars(numa.data(), numa.data() + numa.size(), value);
      d.numa_node = value;
    }
    std::error_code pec;
    for (const auto& port : fs::directory_iterator(dev.path() / "ports", pec)) {
      PortInfo p;
      const std::string number = port.path().filename().string();
      if (!ParseInt(number, &p.number)) continue;
      p.active = ReadLine(port.path() / "state").find("ACTIVE") != std::string::npos;
      p.link_layer = ReadLine(port.path() / "link_layer");
      std::error_code gec;
      for (const auto& g : fs::directory_iterator(port.path() / "gids", gec)) {
        const std::string index = g.path().filename().string();
        GidEntry e;
        if (!ParseInt(index, &e.index)) continue;
        const auto gid = ParseGid(ReadLine(g.path()));
        if (!gid || std::all_of(gid->begin(), gid->end(), [](uint8_t b) { return b == 0; })) {
          continue;  // an unused slot (reads as zeros, or EINVAL on RoCE)
        }
        e.gid = *gid;
        e.roce_v2 = ReadLine(port.path() / "gid_attrs" / "types" / index) == "RoCE v2";
        p.gids.push_back(e);
      }
      std::sort(p.gids.begin(), p.gids.end(),
                [](const GidEntry& a, const GidEntry& b) { return a.index < b.index; });
      d.ports.push_back(std::move(p));
    }
    std::sort(d.ports.begin(), d.ports.end(),
              [](const PortInfo& a, const PortInfo& b) { return a.number < b.number; });
    out.push_back(std::move(d));
  }
  std::sort(out.begin(), out.end(),
            [](const DeviceInfo& a, const DeviceInfo& b) { return a.name < b.name; });
  return out;
}

Result<size_t> DeviceForGpu(int gpu, int num_gpus, size_t num_devices) {
  if (num_devices == 0) return Invalid("no RDMA device to map GPU " + std::to_string(gpu) + " to");
  if (num_gpus <= 0) return Invalid("GPU " + std::to_string(gpu) + " of no GPUs (num_gpus 0)");
  if (gpu < 0 || gpu >= num_gpus) {
    return Invalid("GPU " + std::to_string(gpu) + " is not one of 0.." +
                   std::to_string(num_gpus - 1));
  }
  return static_cast<size_t>(gpu) * num_devices / static_cast<size_t>(num_gpus);
}

Result<int> ChooseGid(const DeviceInfo& device, const PortInfo& port, LinkType link,
                      std::optional<int> requested, std::string* why) {
  const std::string where = device.name + " port " + std::to_string(port.number);
  if (requested) {
    for (const GidEntry& g : port.gids) {
      if (g.index != *requested) continue;
      if (link == LinkType::kEthernet && !g.roce_v2) {
        return Invalid(where + ": GID index " + std::to_string(*requested) +
                       " is not a RoCE v2 GID (Ethernet needs one)");
      }
      *why = where + ": GID index " + std::to_string(*requested) + " (as listed)";
      return *requested;
    }
    return Invalid(where + " has no GID index " + std::to_string(*requested));
  }
  if (link == LinkType::kInfiniBand) {
    *why = where + ": GID index 0 (IB, LID routing)";
    return 0;
  }
  for (const GidEntry& g : port.gids) {
    const std::string ip = g.ipv4();
    if (g.roce_v2 && !ip.empty()) {
      *why = where + ": GID index " + std::to_string(g.index) + " (RoCE v2, " + ip + ")";
      return g.index;
    }
  }
  return Invalid(where +
                 " has no RoCE v2 GID of an IPv4 address: give the index in the device "
                 "list (" +
                 device.name + ":N) or configure an IPv4 address on its netdev");
}

Result<Selection> SelectDevice(const std::vector<DeviceInfo>& found,
                               const SelectionOptions& options) {
  if (found.empty()) {
    return Status(ErrorCode::kUnsupported, "no RDMA devices on this machine");
  }
  // The candidates, in the order given (or every device, by name), each with its GID request.
  struct Candidate {
    const DeviceInfo* device;
    std::optional<int> gid_index;
  };
  std::vector<Candidate> candidates;
  if (options.devices.empty()) {
    for (const DeviceInfo& d : found) candidates.push_back({&d, std::nullopt});
  } else {
    for (const DeviceRequest& r : options.devices) {
      auto it = std::find_if(found.begin(), found.end(),
                             [&](const DeviceInfo& d) { return d.name == r.name; });
      if (it == found.end()) {
        return Invalid("RDMA device '" + r.name +
                       "' is not on this machine (found: " + DescribeDevices(found) + ")");
      }
      candidates.push_back({&*it, r.gid_index});
    }
  }
  size_t pick = 0;
  std::string mapping = "the first listed device";
  if (options.gpu >= 0) {
    // The seed's mapping over every candidate; when it lands off the GPU's NUMA node and some
    // candidate is on it, the local device at the same relative position instead.
    auto index = DeviceForGpu(options.gpu, options.num_gpus, candidates.size());
    if (!index.ok()) return index.status();
    pick = index.value();
    mapping = "GPU " + std::to_string(options.gpu) + " of " + std::to_string(options.num_gpus);
    if (options.gpu_numa >= 0 && candidates[pick].device->numa_node != options.gpu_numa) {
      std::vector<size_t> local;
      for (size_t i = 0; i < candidates.size(); ++i) {
        if (candidates[i].device->numa_node == options.gpu_numa) local.push_back(i);
      }
      if (!local.empty()) {
        pick = local[DeviceForGpu(options.gpu, options.num_gpus, local.size()).value()];
        mapping += " on NUMA node " + std::to_string(options.gpu_numa);
      }
    }
  }
  const DeviceInfo& device = *candidates[pick].device;
  auto port = std::find_if(device.ports.begin(), device.ports.end(),
                           [&](const PortInfo& p) { return p.number == options.port; });
  if (port == device.ports.end()) {
    return Invalid("RDMA device '" + device.name + "' has no port " + std::to_string(options.port));
  }
  const std::string where = device.name + " port " + std::to_string(port->number);
  if (!port->active) return Invalid(where + " is not ACTIVE");
  const bool ethernet = Lower(port->link_layer) == "ethernet";
  if (ethernet != (options.link == LinkType::kEthernet)) {
    return Invalid(where + " has link layer '" + port->link_layer + "', the link type is " +
                   LinkTypeName(options.link));
  }
  std::string why;
  auto gid = ChooseGid(device, *port, options.link, candidates[pick].gid_index, &why);
  if (!gid.ok()) return gid.status();
  Selection s;
  s.device = device.name;
  s.port = port->number;
  s.gid_index = gid.value();
  s.link = options.link;
  s.reason = why + ", " + LinkTypeName(options.link) + ", for " + mapping;
  return s;
}

}  // namespace kvpool::rdma
