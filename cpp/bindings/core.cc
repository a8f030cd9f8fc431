// pybind11 glue for kvpool._core: conversions, GIL release and error mapping only.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <deque>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kvpool/client.h"
#include "kvpool/copy_engine.h"
#include "kvpool/copy_plan.h"
#include "kvpool/hashing.h"
#include "kvpool/logging.h"
#include "kvpool/placement.h"
#include "kvpool/redis_index.h"
#include "kvpool/server.h"
#include "kvpool/staging.h"
#include "kvpool/transport.h"
#include "transport/rdma/devices.h"
#include "transport/rdma/ibverbs.h"

namespace py = pybind11;
using namespace kvpool;

namespace {

/// Carries a non-ok Status to the translator, which raises the matching kvpool.errors class.
struct StatusError {
  Status status;
};

void Check(const Status& s) {
  if (!s.ok()) throw StatusError{s};
}
template <typename T>
T Unwrap(Result<T> r) {
  Check(r.status());
  return std::move(r.value());
}

Status Invalid(const std::string& message) { return Status(ErrorCode::kInvalidArgument, message); }

std::vector<Key128> ToKeys(const py::sequence& keys) {
  std::vector<Key128> out(keys.size());
  for (size_t i = 0; i < out.size(); ++i) {
    py::handle k = keys[i];
    char* data;
    Py_ssize_t len;
    if (!PyBytes_Check(k.ptr()) || PyBytes_AsStringAndSize(k.ptr(), &data, &len) != 0 ||
        len != 16) {
      throw StatusError{Invalid("key " + std::to_string(i) +
                                " must be 16 bytes (a kvpool block key), got " +
                                std::string(py::str(py::repr(k))).substr(0, 80))};
    }
    std::memcpy(out[i].bytes.data(), data, 16);
  }
  return out;
}

/// An int's value; token lists are mostly small ints, read without the generic conversion.
inline long long SmallLongValue(PyObject* o) {
#if PY_VERSION_HEX >= 0x030C0000
  if (PyLong_CheckExact(o) && PyUnstable_Long_IsCompact(reinterpret_cast<PyLongObject*>(o))) {
    return static_cast<long long>(PyUnstable_Long_CompactValue(reinterpret_cast<PyLongObject*>(o)));
  }
#else
  if (PyLong_CheckExact(o)) {
    const Py_ssize_t size = Py_SIZE(o);  // number of 30-bit digits, negative for negative ints
    const auto* digits = reinterpret_cast<PyLongObject*>(o)->ob_digit;
    if (size == 0) return 0;
    if (size == 1) return static_cast<long long>(digits[0]);
    if (size == -1) return -static_cast<long long>(digits[0]);
  }
#endif
  return PyLong_AsLongLong(o);
}

[[noreturn]] void BadId(const char* what, size_t i, long long v) {
  throw StatusError{Invalid(std::string(what) + " " + std::to_string(i) + " = " +
                            std::to_string(v) + " is outside [0, 2**32)")};
}

/// Converts integers of type T to uint32 ids, rejecting values outside [0, 2**32).
template <typename T>
void NarrowIds(const char* what, const T* in, size_t n, std::vector<uint32_t>* out) {
  out->resize(n);
  bool ok = true;
  for (size_t i = 0; i < n; ++i) {  // branch-free so the compiler vectorises it
    ok &= in[i] >= 0 && static_cast<uint64_t>(in[i]) <= 0xffffffffULL;
    (*out)[i] = static_cast<uint32_t>(in[i]);
  }
  if (ok) return;
  for (size_t i = 0; i < n; ++i) {
    if (in[i] < 0 || static_cast<uint64_t>(in[i]) > 0xffffffffULL)
      BadId(what, i, static_cast<long long>(in[i]));
  }
}

/// Ids (token ids, block ids) as uint32: a 1-D buffer of 4- or 8-byte integers, or any
/// sequence of ints. `what` names one id in errors ("token 3 = -1 is outside ...").
std::vector<uint32_t> ToIds(const py::object& ids, const char* what) {
  std::vector<uint32_t> out;
  if (PyObject_CheckBuffer(ids.ptr())) {
    py::buffer_info info = py::reinterpret_borrow<py::buffer>(ids).request();
    const bool contiguous =
        info.ndim == 1 && (info.strides.empty() || info.strides[0] == info.itemsize);
    const char f = info.format.empty() ? '?' : info.format.back();
    const bool integral = std::strchr("iIlLqQ", f) != nullptr;
    if (contiguous && integral && (info.itemsize == 4 || info.itemsize == 8)) {
      const bool is_signed = std::islower(static_cast<unsigned char>(f));
      const auto n = static_cast<size_t>(info.size);
      if (info.itemsize == 4 && is_signed)
        NarrowIds(what, static_cast<const int32_t*>(info.ptr), n, &out);
      if (info.itemsize == 4 && !is_signed)
        NarrowIds(what, static_cast<const uint32_t*>(info.ptr), n, &out);
      if (info.itemsize == 8 && is_signed)
        NarrowIds(what, static_cast<const int64_t*>(info.ptr), n, &out);
      if (info.itemsize == 8 && !is_signed)
        NarrowIds(what, static_cast<const uint64_t*>(info.ptr), n, &out);
      return out;
    }
  }
  const std::string not_ints =
      std::string(what) + " ids must be a sequence of ints or an integer array";
  PyObject* fast = PySequence_Fast(ids.ptr(), not_ints.c_str());
  if (fast == nullptr) throw py::error_already_set();
  py::object guard = py::reinterpret_steal<py::object>(fast);
  const auto n = static_cast<size_t>(PySequence_Fast_GET_SIZE(fast));
  PyObject** items = PySequence_Fast_ITEMS(fast);
  out.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const long long v = SmallLongValue(items[i]);
    if (v == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      throw StatusError{Invalid(std::string(what) + " " + std::to_string(i) + " is not an int")};
    }
    if (v < 0 || v > 0xffffffffLL) BadId(what, i, v);
    out[i] = static_cast<uint32_t>(v);
  }
  return out;
}

/// One C-contiguous buffer, held for the duration of a call (the GIL may be released).
class OneBuffer {
 public:
  OneBuffer(const py::handle& obj, bool writable, const std::string& what) {
    const int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj.ptr(), &view_, flags) != 0) {
      PyErr_Clear();
      throw StatusError{
          Invalid(what + " (" + std::string(py::str(py::type::of(obj).attr("__name__"))) +
                  ") is not a C-contiguous" + (writable ? " writable" : "") + " buffer")};
    }
  }
  ~OneBuffer() { PyBuffer_Release(&view_); }
  // Never copied or moved: an exporter may point into the Py_buffer itself (shape -> len).
  OneBuffer(const OneBuffer&) = delete;
  OneBuffer& operator=(const OneBuffer&) = delete;
  std::span<uint8_t> span() const {
    return {static_cast<uint8_t*>(view_.buf), static_cast<size_t>(view_.len)};
  }

 private:
  Py_buffer view_;
};

/// The buffers of a batch ("block i" in errors), held for the duration of a call.
class BufferViews {
 public:
  BufferViews(const py::sequence& objs, bool writable) {
    for (size_t i = 0; i < objs.size(); ++i) {
      views_.emplace_back(objs[i], writable, "block " + std::to_string(i));
    }
  }
  std::vector<ConstBuffer> Const() const {
    std::vector<ConstBuffer> out;
    out.reserve(views_.size());
    for (const auto& v : views_) out.push_back({v.span().data(), v.span().size()});
    return out;
  }
  std::vector<MutableBuffer> Mutable() const {
    std::vector<MutableBuffer> out;
    out.reserve(views_.size());
    for (const auto& v : views_) out.push_back({v.span().data(), v.span().size()});
    return out;
  }

 private:
  std::deque<OneBuffer> views_;  // grows without moving its elements
};

py::list KeysToList(const std::vector<Key128>& keys) {
  py::list out(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) {
    PyObject* b =
        PyBytes_FromStringAndSize(reinterpret_cast<const char*>(keys[i].bytes.data()), 16);
    if (b == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), b);  // steals the reference
  }
  return out;
}

/// A buffer taken from a staging arena, given back when Python drops the last view of it.
struct StagingBuffer {
  std::shared_ptr<StagingArena> arena;
  MutableBuffer buffer{nullptr, 0};
  ~StagingBuffer() {
    if (buffer.data != nullptr) arena->Give(buffer.data);
  }
};

py::list Flags(const std::vector<uint8_t>& flags) {
  py::list out(flags.size());
  for (size_t i = 0; i < flags.size(); ++i) out[i] = py::bool_(flags[i] != 0);
  return out;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "kvpool's C++ core. Private: use the kvpool package.";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const StatusError& e) {
      py::object exc =
          py::module_::import("kvpool.errors")
              .attr("error_from_code")(static_cast<int>(e.status.code()), e.status.message());
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
    }
  });

  m.def("set_log_level", &SetLogThreshold);
  m.def("host_id", &LocalHostId);
  m.def("cuda_built", &CudaBuilt);
  m.def("cuda_available", [] {
    const Status s = CudaAvailable();
    return s.ok() ? std::string() : s.message();
  });
  m.def(
      "cuda_host_register",
      [](uint64_t address, uint64_t bytes) { Check(CudaHostRegister(address, bytes)); },
      py::arg("address"), py::arg("bytes"));
  m.def(
      "cuda_host_unregister", [](uint64_t address) { Check(CudaHostUnregister(address)); },
      py::arg("address"));
  m.def("rdma_probe", [] {
    const rdma::VerbsProbe p = rdma::ProbeVerbs();
    py::dict out;
    out["built"] = p.built;
    out["library"] = p.library;
    out["devices"] = p.devices;
    out["reason"] = p.reason;
    return out;
  });
  m.def(
      "rdma_devices",
      [](const std::string& root) {
        py::list out;
        for (const rdma::DeviceInfo& d : rdma::DiscoverDevices(root)) {
          py::list ports;
          for (const rdma::PortInfo& p : d.ports) {
            py::list gids;
            for (const rdma::GidEntry& g : p.gids) {
              py::dict gid;
              gid["index"] = g.index;
              gid["roce_v2"] = g.roce_v2;
              gid["ipv4"] = g.ipv4();
              gids.append(gid);
            }
            py::dict port;
            port["number"] = p.number;
            port["active"] = p.active;
            port["link_layer"] = p.link_layer;
            port["gids"] = gids;
            ports.append(port);
          }
          py::dict dev;
          dev["name"] = d.name;
          dev["numa_node"] = d.numa_node;
          dev["ports"] = ports;
          out.append(dev);
        }
        return out;
      },
      py::arg("root") = "/sys/class/infiniband");
  m.def("error_code_name", [](int code) { return ErrorCodeName(static_cast<ErrorCode>(code)); });

  py::class_<Namespace>(m, "Namespace")
      .def(py::init<>())
      .def_readwrite("model", &Namespace::model)
      .def_readwrite("revision", &Namespace::revision)
      .def_readwrite("dtype", &Namespace::dtype)
      .def_readwrite("kv_layout", &Namespace::kv_layout)
      .def_readwrite("attention_backend", &Namespace::attention_backend)
      .def_readwrite("block_tokens", &Namespace::block_tokens)
      .def_readwrite("tp_size", &Namespace::tp_size)
      .def_readwrite("tp_rank", &Namespace::tp_rank)
      .def_readwrite("layer_begin", &Namespace::layer_begin)
      .def_readwrite("layer_end", &Namespace::layer_end)
      .def_readwrite("salts", &Namespace::salts)
      .def("canonical", [](const Namespace& ns) { return py::bytes(ns.Canonical()); })
      .def("fingerprint", [](const Namespace& ns) {
        const Key128 k = Unwrap(ns.Fingerprint());
        return py::bytes(reinterpret_cast<const char*>(k.bytes.data()), 16);
      });

  m.def(
      "chain_block_keys",
      [](const py::bytes& fingerprint, const py::object& tokens, uint32_t block_tokens) {
        std::string_view fp = fingerprint;
        if (fp.size() != 16) throw StatusError{Invalid("fingerprint must be 16 bytes")};
        if (block_tokens == 0) throw StatusError{Invalid("block_tokens must be > 0")};
        const std::vector<uint32_t> ids = ToIds(tokens, "token");
        std::vector<Key128> keys;
        {
          py::gil_scoped_release release;
          ChainBlockKeys(Key128::FromBytes(fp.data()), ids, block_tokens, &keys);
        }
        return KeysToList(keys);
      },
      py::arg("fingerprint"), py::arg("tokens"), py::arg("block_tokens"));

  py::class_<Placement>(m, "Placement")
      .def(py::init(
               [](const std::vector<std::string>& node_ids, const std::vector<double>& weights) {
                 return Unwrap(Placement::Create(node_ids, weights));
               }),
           py::arg("node_ids"), py::arg("weights"))
      .def(
          "rank",
          [](const Placement& p, const py::sequence& keys, size_t k) {
            return p.Rank(ToKeys(keys), k);
          },
          py::arg("keys"), py::arg("k"))
      .def("__len__", &Placement::size);

  py::class_<RedisIndexReader>(m, "RedisIndexReader")
      .def(py::init([](const std::string& host, uint16_t port, const std::string& username,
                       const std::string& password, int db, const std::string& meta_key,
                       const std::vector<std::string>& partition_keys, uint32_t timeout_ms) {
             return std::make_unique<RedisIndexReader>(
                 RedisEndpoint{host, port, username, password, db}, meta_key, partition_keys,
                 timeout_ms);
           }),
           py::arg("host"), py::arg("port"), py::arg("username"), py::arg("password"),
           py::arg("db"), py::arg("meta_key"), py::arg("partition_keys"), py::arg("timeout_ms"))
      .def("lookup",
           [](RedisIndexReader& reader, const py::sequence& keys) {
             const auto k = ToKeys(keys);
             int64_t epoch = 0;
             std::vector<std::string> holders;
             {
               py::gil_scoped_release release;
               Check(reader.Lookup(k, &epoch, &holders));
             }
             py::list out(holders.size());
             for (size_t i = 0; i < holders.size(); ++i) {
               PyObject* s = PyUnicode_DecodeUTF8(
                   holders[i].data(), static_cast<Py_ssize_t>(holders[i].size()), "strict");
               if (s == nullptr) throw py::error_already_set();
               PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), s);
             }
             return py::make_tuple(epoch, out);
           })
      .def("locate", [](RedisIndexReader& reader, const py::sequence& keys,
                        const std::vector<std::string>& live) {
        const auto k = ToKeys(keys);
        int64_t epoch = 0;
        std::vector<int32_t> holder;
        {
          py::gil_scoped_release release;
          Check(reader.Locate(k, live, &epoch, &holder));
        }
        return py::make_tuple(epoch, holder);
      });

  py::class_<KVRegion>(m, "KVRegion")
      .def(py::init([](uint64_t base, uint64_t stride, uint64_t bytes, uint32_t num_blocks) {
             return KVRegion{base, stride, bytes, num_blocks};
           }),
           py::arg("base"), py::arg("stride"), py::arg("bytes"), py::arg("num_blocks"))
      .def_readonly("base", &KVRegion::base)
      .def_readonly("stride", &KVRegion::stride)
      .def_readonly("bytes", &KVRegion::bytes)
      .def_readonly("num_blocks", &KVRegion::num_blocks)
      .def("__repr__", [](const KVRegion& g) {
        return "KVRegion(base=" + std::to_string(g.base) + ", stride=" + std::to_string(g.stride) +
               ", bytes=" + std::to_string(g.bytes) +
               ", num_blocks=" + std::to_string(g.num_blocks) + ")";
      });

  py::class_<CopyEngine>(m, "CopyEngine")
      .def_static(
          "cpu",
          [](std::vector<KVRegion> regions, unsigned threads, uint64_t parallel_bytes) {
            return Unwrap(MakeCpuCopyEngine(std::move(regions), threads, parallel_bytes));
          },
          py::arg("regions"), py::arg("threads") = 1, py::arg("parallel_bytes") = 8ULL << 20)
      .def_static(
          "cuda",
          [](std::vector<KVRegion> regions, int device) {
            return Unwrap(MakeCudaCopyEngine(std::move(regions), device));
          },
          py::arg("regions"), py::arg("device") = -1)
      .def("set_compute_stream", &CopyEngine::SetComputeStream, py::arg("stream"))
      .def_property_readonly("object_bytes", &CopyEngine::object_bytes)
      .def_property_readonly("num_blocks", &CopyEngine::num_blocks)
      .def_property_readonly("device", &CopyEngine::device)
      .def_property_readonly("regions", &CopyEngine::regions)
      .def("gather",
           [](CopyEngine& e, const py::object& block_ids, const py::object& staging) {
             const auto ids = ToIds(block_ids, "block");
             OneBuffer buf(staging, true, "staging");
             py::gil_scoped_release release;
             Check(e.Gather(ids, buf.span()));
           })
      .def("scatter",
           [](CopyEngine& e, const py::object& block_ids, const py::object& staging) {
             const auto ids = ToIds(block_ids, "block");
             OneBuffer buf(staging, false, "staging");
             py::gil_scoped_release release;
             Check(e.Scatter(ids, buf.span()));
           })
      // The caller keeps `staging` alive until wait() (kvpool.copy.CopyEngine does).
      .def("start_gather",
           [](CopyEngine& e, const py::object& block_ids, const py::object& staging) {
             const auto ids = ToIds(block_ids, "block");
             OneBuffer buf(staging, true, "staging");
             py::gil_scoped_release release;
             return Unwrap(e.StartGather(ids, buf.span()));
           })
      .def("start_scatter",
           [](CopyEngine& e, const py::object& block_ids, const py::object& staging) {
             const auto ids = ToIds(block_ids, "block");
             OneBuffer buf(staging, false, "staging");
             py::gil_scoped_release release;
             return Unwrap(e.StartScatter(ids, buf.span()));
           })
      .def(
          "wait", [](CopyEngine& e, CopyTicket ticket) { Check(e.Wait(ticket)); },
          py::arg("ticket"), py::call_guard<py::gil_scoped_release>());

  m.def(
      "plan_copies",
      [](const std::vector<KVRegion>& regions, const py::object& block_ids, uint64_t staging,
         bool gather) {
        const auto ids = ToIds(block_ids, "block");
        std::vector<CopyRun> runs;
        PlanCopies(regions, ids, staging, gather ? CopyDirection::kGather : CopyDirection::kScatter,
                   &runs);
        py::list out;
        for (const CopyRun& r : runs) out.append(py::make_tuple(r.src, r.dst, r.bytes));
        return out;
      },
      py::arg("regions"), py::arg("block_ids"), py::arg("staging"), py::arg("gather"),
      "The copies (src, dst, bytes) of a gather or scatter, as both engines run them.");

  py::class_<RdmaOptions>(m, "RdmaOptions")
      .def(py::init<>())
      .def_readwrite("devices", &RdmaOptions::devices)
      .def_readwrite("link_type", &RdmaOptions::link_type)
      .def_readwrite("port", &RdmaOptions::port)
      .def_readwrite("gpu", &RdmaOptions::gpu)
      .def_readwrite("num_gpus", &RdmaOptions::num_gpus)
      .def_readwrite("gpu_numa", &RdmaOptions::gpu_numa)
      .def("validate", [](const RdmaOptions& o) { Check(ValidateRdmaOptions(o)); });

  py::class_<ServerOptions>(m, "ServerOptions")
      .def(py::init<>())
      .def_readwrite("host", &ServerOptions::host)
      .def_readwrite("port", &ServerOptions::port)
      .def_readwrite("max_connections", &ServerOptions::max_connections)
      .def_readwrite("io_timeout_ms", &ServerOptions::io_timeout_ms)
      .def_property(
          "capacity", [](const ServerOptions& o) { return o.store.capacity; },
          [](ServerOptions& o, size_t v) { o.store.capacity = v; })
      .def_property(
          "high_watermark", [](const ServerOptions& o) { return o.store.high_watermark; },
          [](ServerOptions& o, double v) { o.store.high_watermark = v; })
      .def_property(
          "eviction",
          [](const ServerOptions& o) { return std::string(EvictionKindName(o.store.eviction)); },
          [](ServerOptions& o, const std::string& v) {
            o.store.eviction = Unwrap(ParseEvictionKind(v));
          })
      .def_property(
          "hugepages",
          [](const ServerOptions& o) { return std::string(HugePagesName(o.store.hugepages)); },
          [](ServerOptions& o, const std::string& v) {
            o.store.hugepages = Unwrap(ParseHugePages(v));
          })
      .def_property(
          "event_capacity", [](const ServerOptions& o) { return o.store.event_capacity; },
          [](ServerOptions& o, size_t v) { o.store.event_capacity = v; })
      .def_property(
          "max_batch_keys", [](const ServerOptions& o) { return o.limits.max_batch_keys; },
          [](ServerOptions& o, uint32_t v) { o.limits.max_batch_keys = v; })
      .def_property(
          "max_frame_bytes", [](const ServerOptions& o) { return o.limits.max_frame_bytes; },
          [](ServerOptions& o, uint64_t v) { o.limits.max_frame_bytes = v; })
      .def_property(
          "max_block_bytes", [](const ServerOptions& o) { return o.limits.max_block_bytes; },
          [](ServerOptions& o, uint64_t v) { o.limits.max_block_bytes = v; })
      .def_property(
          "protocol_version", [](const ServerOptions& o) { return o.limits.version; },
          [](ServerOptions& o, uint32_t v) { o.limits.version = v; })
      .def_property(
          "transports",
          [](const ServerOptions& o) {
            std::vector<std::string> out;
            for (TransportKind k : o.transports) out.emplace_back(TransportKindName(k));
            return out;
          },
          [](ServerOptions& o, const std::vector<std::string>& names) {
            o.transports.clear();
            for (const auto& n : names) o.transports.push_back(Unwrap(ParseTransportKind(n)));
          })
      .def_readwrite("shm_socket", &ServerOptions::shm_socket)
      .def_readwrite("shm_allow_uids", &ServerOptions::shm_allow_uids)
      .def_readwrite("shm_allow_gids", &ServerOptions::shm_allow_gids)
      .def_readwrite("shm_max_arena_bytes", &ServerOptions::shm_max_arena_bytes)
      .def_readwrite("rdma", &ServerOptions::rdma)
      .def_readwrite("auth_tokens", &ServerOptions::auth_tokens);

  py::class_<StagingBuffer>(m, "StagingBuffer", py::buffer_protocol())
      .def_buffer([](StagingBuffer& b) {
        return py::buffer_info(b.buffer.data, 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.buffer.size)}, {1});
      });

  py::class_<StagingArena, std::shared_ptr<StagingArena>>(m, "StagingArena")
      .def(py::init([](size_t bytes) { return Unwrap(StagingArena::Create(bytes)); }),
           py::arg("bytes"))
      .def_property_readonly("size", &StagingArena::size)
      .def_property_readonly("used_bytes", &StagingArena::used_bytes)
      .def_property_readonly(
          "address", [](const StagingArena& a) { return reinterpret_cast<uint64_t>(a.base()); },
          "The arena's first byte (for cudaHostRegister).")
      .def("take", [](const std::shared_ptr<StagingArena>& arena, size_t bytes) -> py::object {
        const MutableBuffer b = arena->Take(bytes);
        if (b.data == nullptr) return py::none();
        auto out = std::make_unique<StagingBuffer>();
        out->arena = arena;
        out->buffer = {b.data, bytes};
        return py::cast(std::move(out));
      });

  py::class_<Server>(m, "Server")
      .def_static(
          "start",
          [](const ServerOptions& options) {
            py::gil_scoped_release release;
            return Unwrap(Server::Start(options));
          },
          py::arg("options"))
      .def_property_readonly("port", &Server::port)
      .def_property_readonly("host", &Server::host)
      .def_property_readonly("shm_socket", &Server::shm_socket)
      .def("stop", &Server::Stop, py::call_guard<py::gil_scoped_release>())
      .def("stats_json", &Server::StatsJson, py::call_guard<py::gil_scoped_release>())
      .def(
          "drain_events",
          [](Server& server, size_t max) {
            std::vector<BlockEvent> events;
            uint64_t dropped = 0;
            {
              py::gil_scoped_release release;
              server.store().DrainEvents(max, &events, &dropped);
            }
            // Two parallel buffers, oldest first: the keys (16 bytes each) and one flag byte per
            // key (BlockEvent::added); then the number of events dropped by overflow.
            std::string keys, added;
            keys.reserve(events.size() * sizeof(Key128));
            added.reserve(events.size());
            for (const BlockEvent& e : events) {
              keys.append(reinterpret_cast<const char*>(e.key.bytes.data()), sizeof(Key128));
              added.push_back(e.added ? 1 : 0);
            }
            return py::make_tuple(py::bytes(keys), py::bytes(added), dropped);
          },
          py::arg("max"))
      .def("snapshot_keys", [](Server& server) {
        std::vector<Key128> keys;
        {
          py::gil_scoped_release release;
          server.store().SnapshotKeys(&keys);
        }
        return py::bytes(reinterpret_cast<const char*>(keys.data()), keys.size() * sizeof(Key128));
      });

  py::class_<Client>(m, "Client")
      .def(py::init([](const std::string& host, uint16_t port, uint32_t timeout_ms,
                       uint32_t connect_timeout_ms, uint32_t max_idle_connections,
                       const std::string& transport,
                       std::optional<std::shared_ptr<StagingArena>> arena, size_t arena_bytes,
                       std::optional<RdmaOptions> rdma, const std::string& auth_token) {
             ClientOptions o{host, port, timeout_ms, connect_timeout_ms, max_idle_connections};
             o.transport = Unwrap(ParseTransportChoice(transport));
             if (arena) o.arena = *arena;
             o.arena_bytes = arena_bytes;
             if (rdma) o.rdma = *rdma;
             o.auth_token = auth_token;
             py::gil_scoped_release release;
             return Unwrap(Client::Connect(o));
           }),
           py::arg("host"), py::arg("port"), py::arg("timeout_ms"), py::arg("connect_timeout_ms"),
           py::arg("max_idle_connections"), py::arg("transport") = "auto",
           py::arg("arena") = std::nullopt, py::arg("arena_bytes") = size_t{64} << 20,
           py::arg("rdma") = std::nullopt, py::arg("auth_token") = "")
      .def_property_readonly("address", &Client::address)
      .def_property_readonly(
          "transport", [](Client& c) { return std::string(TransportKindName(c.transport())); })
      .def("arena", [](Client& c) { return Unwrap(c.EnsureArena()); })
      .def_property_readonly("max_block_bytes",
                             [](Client& c) { return c.limits().max_block_bytes; })
      .def("put",
           [](Client& c, const py::sequence& keys, const py::sequence& blocks) {
             const auto k = ToKeys(keys);
             BufferViews views(blocks, false);
             const auto b = views.Const();
             std::vector<uint8_t> statuses(k.size());
             {
               py::gil_scoped_release release;
               Check(c.Put(k, b, statuses));
             }
             return statuses;
           })
      .def("get_into",
           [](Client& c, const py::sequence& keys, const py::sequence& buffers) {
             const auto k = ToKeys(keys);
             BufferViews views(buffers, true);
             const auto b = views.Mutable();
             std::vector<uint8_t> found(k.size());
             {
               py::gil_scoped_release release;
               Check(c.GetInto(k, b, found));
             }
             return Flags(found);
           })
      .def("get",
           [](Client& c, const py::sequence& keys) {
             const auto k = ToKeys(keys);
             std::vector<uint8_t> found(k.size());
             std::vector<py::object> blocks(k.size());
             {
               py::gil_scoped_release release;
               Check(c.Get(
                   k,
                   [&](size_t i, size_t size) -> uint8_t* {
                     py::gil_scoped_acquire acquire;
                     PyObject* b =
                         PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(size));
                     if (b == nullptr) {
                       PyErr_Clear();
                       return nullptr;
                     }
                     blocks[i] = py::reinterpret_steal<py::object>(b);
                     return reinterpret_cast<uint8_t*>(PyBytes_AS_STRING(b));
                   },
                   found));
             }
             py::list out(k.size());
             for (size_t i = 0; i < k.size(); ++i) out[i] = found[i] ? blocks[i] : py::none();
             return out;
           })
      .def("exists",
           [](Client& c, const py::sequence& keys) {
             const auto k = ToKeys(keys);
             std::vector<uint8_t> present(k.size());
             {
               py::gil_scoped_release release;
               Check(c.Exists(k, present));
             }
             return Flags(present);
           })
      .def("delete",
           [](Client& c, const py::sequence& keys) {
             const auto k = ToKeys(keys);
             std::vector<uint8_t> deleted(k.size());
             {
               py::gil_scoped_release release;
               Check(c.Delete(k, deleted));
             }
             return Flags(deleted);
           })
      .def("match_prefix",
           [](Client& c, const py::sequence& keys) {
             const auto k = ToKeys(keys);
             py::gil_scoped_release release;
             return Unwrap(c.MatchPrefix(k));
           })
      .def("stats_json", [](Client& c) {
        py::gil_scoped_release release;
        return Unwrap(c.StatsJson());
      });
}
