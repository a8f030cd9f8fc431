"""RDMA device selection as the seed configures it: a device list ``name[:gid_index],...`` (e.g.
``mlx5_1:6,mlx5_2:7``), a link type (``IB``: LID routing; ``Ethernet``: RoCE v2 with a GRH on the
chosen GID), a port, and the GPU a process is bound to (GPU i of n uses device i*ndev/n, devices
on the GPU's NUMA node preferred). Nodes, :class:`kvpool.Client`, :class:`kvpool.Cluster` and
the vLLM connector take the same four settings; the core checks and applies them (imported on
use: ``kvpool.config`` imports this module and must load when the extension does not)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvpool.errors import InvalidArgumentError, KVPoolError

LINK_TYPES = ("IB", "Ethernet")


@dataclass(frozen=True)
class RdmaSettings:
    """Which RDMA device, port and GID to use. The defaults take the first device found,
    RoCE v2 on port 1, with the GID of the port's IPv4 address."""

    devices: str = ""
    link_type: str = "Ethernet"
    port: int = 1
    gpu: int = -1  #: the CUDA device this process is bound to; -1: none

    def check(
        self,
        error: type[InvalidArgumentError] = InvalidArgumentError,
        names: Mapping[str, str] | None = None,
    ) -> None:
        """Raises ``error`` naming the first bad setting: ``rdma_<field>``, or ``names[field]``
        where the value came from elsewhere (a variable of the seed's)."""
        from kvpool import _core

        fields: tuple[tuple[str, str | int], ...] = (
            ("devices", self.devices),
            ("link_type", self.link_type),
            ("port", self.port),
            ("gpu", self.gpu),
        )
        for name, value in fields:
            shown = (names or {}).get(name, f"rdma_{name}")
            # The core takes C ints (and the GPU count is gpu + 1): anything wider is refused here.
            if isinstance(value, int) and not -(2**31) <= value < 2**31 - 1:
                raise error(f"{shown} = {value!r}: out of range")
            one = _core.RdmaOptions()
            setattr(one, name, value)
            if name == "gpu":
                one.num_gpus = max(self.gpu + 1, 1)  # the GPU count is checked by options()
            try:
                one.validate()
            except KVPoolError as e:
                raise error(f"{shown} = {value!r}: {e}") from None

    def options(self) -> Any:
        """The core's options, with the GPU binding resolved (GPU count and NUMA node)."""
        from kvpool import _core

        self.check()
        o = _core.RdmaOptions()
        o.devices, o.link_type, o.port, o.gpu = self.devices, self.link_type, self.port, self.gpu
        if self.gpu >= 0:
            o.num_gpus, o.gpu_numa = gpu_topology(self.gpu)
            if o.num_gpus <= self.gpu:
                raise InvalidArgumentError(
                    f"rdma_gpu = {self.gpu}, but this host has {o.num_gpus} visible GPU(s);"
                    " set rdma_gpu = -1 for no GPU binding"
                )
        return o


def gpu_topology(gpu: int) -> tuple[int, int]:
    """(visible GPUs, NUMA node of GPU ``gpu`` or -1). From torch when it is loaded and sees
    CUDA; else from CUDA_VISIBLE_DEVICES, else the NVIDIA driver's /proc listing."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                count = int(torch.cuda.device_count())
                numa = -1
                if gpu < count:
                    p = torch.cuda.get_device_properties(gpu)
                    domain = int(getattr(p, "pci_domain_id", 0))
                    bus, dev = getattr(p, "pci_bus_id", None), getattr(p, "pci_device_id", None)
                    if bus is not None and dev is not None:
                        numa = _pci_numa(f"{domain:04x}:{int(bus):02x}:{int(dev):02x}.0")
                return count, numa
        except Exception:  # a broken CUDA setup must not break RDMA selection  # noqa: BLE001
            pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([v for v in visible.split(",") if v.strip() and v.strip() != "-1"]), -1
    try:
        return len(list(Path("/proc/driver/nvidia/gpus").iterdir())), -1
    except OSError:
        return 0, -1


def _pci_numa(bdf: str) -> int:
    try:
        return int(Path(f"/sys/bus/pci/devices/{bdf}/numa_node").read_text().strip())
    except (OSError, ValueError):
        return -1
