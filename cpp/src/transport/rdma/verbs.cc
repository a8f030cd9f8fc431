// The provider-independent half of verbs.h: names, the QP address's wire form, and the choice
// of provider and device.
#include "transport/rdma/verbs.h"

#include <cstdlib>
#include <cstring>

#include "transport/rdma/devices.h"
#include "transport/rdma/ibverbs.h"

namespace kvpool {

Status ValidateRdmaOptions(const RdmaOptions& options) {
  auto devices = rdma::ParseDeviceList(options.devices);
  if (!devices.ok()) return devices.status();
  auto link = rdma::ParseLinkType(options.link_type);
  if (!link.ok()) return link.status();
  if (options.port < 1 || options.port > 255) {
    return Status(ErrorCode::kInvalidArgument,
                  "RDMA port " + std::to_string(options.port) + " is not in 1..255");
  }
  if (options.gpu >= 0) {
    auto index = rdma::DeviceForGpu(options.gpu, options.num_gpus, 1);
    if (!index.ok()) return index.status();
  } else if (options.gpu != -1) {
    return Status(ErrorCode::kInvalidArgument,
                  "RDMA GPU " + std::to_string(options.gpu) + " is not a GPU index (or -1: none)");
  }
  return Status::Ok();
}

namespace rdma {

const char* QpStateName(QpState state) {
  switch (state) {
    case QpState::kReset:
      return "RESET";
    case QpState::kInit:
      return "INIT";
    case QpState::kRtr:
      return "RTR";
    case QpState::kRts:
      return "RTS";
    case QpState::kError:
      return "ERROR";
  }
  return "?";
}

const char* WcStatusName(WcStatus status) {
  switch (status) {
    case WcStatus::kSuccess:
      return "success";
    case WcStatus::kLocalLength:
      return "local length error";
    case WcStatus::kLocalProtection:
      return "local protection error";
    case WcStatus::kRemoteAccess:
      return "remote access error";
    case WcStatus::kRetryExceeded:
      return "transport retry counter exceeded";
    case WcStatus::kFlushed:
      return "work request flushed";
    case WcStatus::kGeneral:
      return "general error";
  }
  return "?";
}

Status CheckPost(QpState state, uint64_t outstanding, size_t adding, size_t max) {
  if (state != QpState::kRts) {
    return Status(ErrorCode::kProtocol, std::string("Post on a QP in state ") + QpStateName(state));
  }
  if (outstanding + adding > max) {
    return Status(ErrorCode::kProtocol, "send queue full: " + std::to_string(outstanding) +
                                            " outstanding of " + std::to_string(max));
  }
  return Status::Ok();
}

Result<std::unique_ptr<Device>> OpenDevice(const RdmaOptions& options,
                                           const std::string& sysfs_root) {
  KVPOOL_RETURN_IF_ERROR(ValidateRdmaOptions(options));
  const char* env = std::getenv("KVPOOL_RDMA_PROVIDER");
  const std::string_view provider = env != nullptr ? env : "";
  if (provider == "soft") return OpenSoftDevice();
  if (!provider.empty() && provider != "ibverbs") {
    return Status(ErrorCode::kUnsupported, "KVPOOL_RDMA_PROVIDER='" + std::string(provider) +
                                               "' is not a provider (ibverbs, soft)");
  }
  SelectionOptions select;
  select.devices = ParseDeviceList(options.devices).value();
  select.link = ParseLinkType(options.link_type).value();
  select.port = options.port;
  select.gpu = options.gpu;
  select.num_gpus = options.num_gpus;
  select.gpu_numa = options.gpu_numa;
  const std::vector<DeviceInfo> found = DiscoverDevices(sysfs_root);
  if (found.empty()) {
    return Status(
        ErrorCode::kUnsupported,
        (options.devices.empty() ? std::string()
                                 : "RDMA devices '" + options.devices + "' asked for, but ") +
            "no RDMA devices on this machine (none under " + sysfs_root +
            "; KVPOOL_RDMA_PROVIDER=soft runs the software provider, same host only)");
  }
  auto chosen = SelectDevice(found, select);
  if (!chosen.ok()) return chosen.status();
  return OpenVerbsDevice(chosen.value());
}

std::string EncodeQpAddress(const QpAddress& a) {
  std::string out(kQpAddressBytes, '\0');
  char* p = out.data();
  std::memcpy(p, &a.qp_num, 4);
  std::memcpy(p + 4, &a.psn, 4);
  std::memcpy(p + 8, &a.lid, 2);
  std::memcpy(p + 10, a.gid.data(), 16);
  std::memcpy(p + 26, &a.soft_pid, 8);
  std::memcpy(p + 34, &a.soft_table, 8);
  p[42] = static_cast<char>(a.mtu);
  p[43] = static_cast<char>(a.rd_atomic);
  return out;
}

bool DecodeQpAddress(std::string_view bytes, QpAddress* a) {
  if (bytes.size() < kQpAddressBytes) return false;
  const char* p = bytes.data();
  std::memcpy(&a->qp_num, p, 4);
  std::memcpy(&a->psn, p + 4, 4);
  std::memcpy(&a->lid, p + 8, 2);
  std::memcpy(a->gid.data(), p + 10, 16);
  std::memcpy(&a->soft_pid, p + 26, 8);
  std::memcpy(&a->soft_table, p + 34, 8);
  a->mtu = static_cast<uint8_t>(p[42]);
  a->rd_atomic = static_cast<uint8_t>(p[43]);
  return true;
}

}  // namespace rdma
}  // namespace kvpool
