#!/usr/bin/env bash
# The GPU checks of kvpool's CUDA copy engine, as one script for a lent GPU machine.
#
#   bash scripts/device_check.sh --prepare     # here, with network: what the device lacks
#   bash scripts/device_check.sh OUTDIR        # on the device (offline), or anywhere
#
# --prepare (run on a machine with network to PyPI, from the repository root or anywhere):
#   - build/device-wheels: wheels of kvpool's pure-Python and test dependencies (redis, hiredis,
#     prometheus-client, numpy, pytest and theirs) for CPython 3.12, manylinux x86_64
#     (PREPARE_PYTHON_VERSION=3.13 for another);
#   - build/device-include: the 9 CUDA runtime headers kvpool's build needs (cuda_runtime_api.h
#     and what it includes, taken from the local CUDA 13 headers) and xxhash.h (the core uses it
#     header-only, XXH_INLINE_ALL).
#   Both are ignored by git (/build/), so the device tool must carry them by name:
#     run(command="bash scripts/device_check.sh $OUT", carry=["build/device-wheels",
#         "build/device-include"], timeout_s=540)
#
# OUTDIR mode, each step under `timeout`, all within DEVICE_CHECK_BUDGET_S (default 470 s);
# a step that fails is recorded and the script goes on to the summary:
#   headers  find cuda_runtime_api.h (CUDA >= 13: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, the
#            pip nvidia-* packages in site-packages, then build/device-include) and xxhash.h
#            (/usr/include, /usr/local/include, $CONDA_PREFIX, then build/device-include),
#            each proven by compiling against it;
#   venv     a fresh virtual environment (--system-site-packages, plus a .pth naming the chosen
#            interpreter's own site-packages, so torch is visible even when that interpreter
#            is itself a venv);
#   deps     redis, hiredis, prometheus-client, numpy, pytest where missing: from
#            build/device-wheels (--no-index) when it exists, else from the index;
#   build    pip install --no-build-isolation --no-deps . with the include dirs passed as
#            -Ccmake.define.KVPOOL_CUDA_INCLUDE_DIR / KVPOOL_XXHASH_INCLUDE_DIR (build tree:
#            build/device-check/);
#   info     torch / CUDA versions, GPU name, kvpool._core.cuda_built(), kvpool.copy.
#            cuda_available() and its reason (with torch imported, and in a process without
#            torch, which has to find libcudart.so.13 on its own) -> OUTDIR/info.json;
#   pytest   pytest -m gpu on tests/python/test_gpu.py copied (with conftest.py, wire.py) to a temporary
#            directory and run against the installed package (a skip counts as a failure when
#            torch sees a GPU) -> OUTDIR/pytest.xml;
#   bench    bench/gpu_copy.py --quick --json-out OUTDIR/gpu_copy.json;
#   summary  OUTDIR/device_check.json (steps, exit codes, seconds, key figures) and a table.
# Every step's full output is in OUTDIR/<step>.log. Exit status: 0 when every step passed
# (without a GPU the GPU steps pass by reporting "no GPU"), 1 otherwise.
#
# Environment: PYTHON (default: the first of python3, python3.12, python that imports torch),
# DEVICE_CHECK_BUDGET_S (470), DEVICE_CHECK_BUILD_TIMEOUT_S (300), DEVICE_CHECK_WORK (a temp
# dir), CXX (c++).
set -uo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
REPO="$(cd "$(dirname "$SELF")/.." && pwd)"
WHEELS="$REPO/build/device-wheels"
INCLUDE="$REPO/build/device-include"
CXX="${CXX:-c++}"
DEPS=("redis>=5" "hiredis>=2" "prometheus-client>=0.17" "numpy" "pytest>=8")

log() { echo "[device_check $(date +%H:%M:%S)] $*"; }

cuda_ok() {  # DIR: cuda_runtime_api.h of CUDA >= 13 compiles from DIR
  [ -f "$1/cuda_runtime_api.h" ] || return 1
  printf '%s\n' '#include <cuda_runtime_api.h>' \
    '#if !defined(CUDART_VERSION) || CUDART_VERSION < 13000' \
    '#error "CUDA runtime headers older than 13.0"' '#endif' \
    | "$CXX" -x c++ -std=c++20 -fsyntax-only -I"$1" - 2>/dev/null
}

xxhash_ok() {  # DIR: xxhash.h (with XXH3) compiles from DIR
  [ -f "$1/xxhash.h" ] || return 1
  printf '%s\n' '#define XXH_INLINE_ALL' '#include <xxhash.h>' \
    'unsigned long long f(const void* p) { XXH128_hash_t h = XXH3_128bits(p, 1);' \
    '  return h.low64 ^ XXH3_64bits_withSeed(p, 1, 7); }' \
    | "$CXX" -x c++ -std=c++20 -fsyntax-only -I"$1" - 2>/dev/null
}

site_dirs() {  # PYTHON: its site-packages directories, one a line
  "$1" - <<'EOF' 2>/dev/null
import site, sysconfig
dirs = list(site.getsitepackages()) + [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
if site.ENABLE_USER_SITE:
    dirs.append(site.getusersitepackages())
seen = set()
for d in dirs:
    if d not in seen:
        seen.add(d)
        print(d)
EOF
}

# ---------------------------------------------------------------------------------------------
# --prepare: run here (network), fills build/device-wheels and build/device-include.

prepare() {
  local py="${PYTHON:-}" version="${PREPARE_PYTHON_VERSION:-3.12}"
  if [ -z "$py" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then py="$REPO/.venv/bin/python"; else py=python3; fi
  fi
  local abi="cp${version//./}"
  mkdir -p "$WHEELS" "$INCLUDE"
  log "wheels for CPython $version manylinux x86_64 -> $WHEELS"
  "$py" -m pip download --quiet --dest "$WHEELS" --only-binary=:all: \
    --python-version "$version" --implementation cp --abi "$abi" \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    "${DEPS[@]}" pip || { log "pip download failed"; return 1; }

  local cuda="" d
  for d in "${CUDA_HOME:-}/include" "${CUDA_PATH:-}/include" /usr/local/cuda/include \
           /usr/local/cuda/targets/x86_64-linux/include; do
    if cuda_ok "$d"; then cuda="$d"; break; fi
  done
  if [ -z "$cuda" ]; then
    log "no CUDA >= 13 cuda_runtime_api.h here (set CUDA_HOME); build/device-include has none"
    return 1
  fi
  log "CUDA headers from $cuda -> $INCLUDE"
  local h rel n=0
  # shellcheck disable=SC1003  # tr deletes the backslashes of the make rule's continuations
  for h in $(printf '#include <cuda_runtime_api.h>\n' \
               | "$CXX" -x c++ -std=c++20 -E -M - -I"$cuda" | tr -d '\\' | tr ' ' '\n'); do
    case "$h" in
      "$cuda"/*.h)
        rel="${h#"$cuda"/}"
        mkdir -p "$INCLUDE/$(dirname "$rel")"
        cp "$h" "$INCLUDE/$rel"
        n=$((n + 1))
        ;;
    esac
  done
  log "copied $n CUDA headers"
  local xx=""
  for d in /usr/include /usr/local/include; do
    if xxhash_ok "$d"; then xx="$d"; break; fi
  done
  if [ -z "$xx" ]; then log "no xxhash.h here (apt-get install libxxhash-dev)"; return 1; fi
  cp "$xx/xxhash.h" "$INCLUDE/xxhash.h"
  cuda_ok "$INCLUDE" || { log "build/device-include does not compile cuda_runtime_api.h"; return 1; }
  xxhash_ok "$INCLUDE" || { log "build/device-include does not compile xxhash.h"; return 1; }
  log "build/device-include compiles cuda_runtime_api.h and xxhash.h on its own"
  echo "--- build/device-wheels ($(du -sh "$WHEELS" | cut -f1))"
  find "$WHEELS" -maxdepth 1 -type f -printf '%10s  %f\n' | sort -k2
  echo "--- build/device-include ($(du -sh "$INCLUDE" | cut -f1))"
  (cd "$INCLUDE" && find . -type f | sort)
  echo "carry: build/device-wheels build/device-include ($(du -shc "$WHEELS" "$INCLUDE" | tail -1 | cut -f1) in all)"
}

# ---------------------------------------------------------------------------------------------
# The steps (each runs as `bash device_check.sh __step NAME` under timeout; state in $WORK).

step_headers() {
  local cuda="" xx="" d sp
  local -a cands=("${CUDA_HOME:-}/include" "${CUDA_PATH:-}/include" /usr/local/cuda/include
                  /usr/local/cuda/targets/x86_64-linux/include)
  while IFS= read -r sp; do
    [ -d "$sp" ] || continue
    while IFS= read -r d; do cands+=("$(dirname "$d")"); done < <(
      find "$sp" -maxdepth 6 -name cuda_runtime_api.h -path '*include*' 2>/dev/null | sort)
  done < <(site_dirs "$PY")
  cands+=("$INCLUDE")
  "$CXX" --version | head -1 || { echo "no C++ compiler ($CXX)"; return 1; }
  for d in "${cands[@]}"; do
    [ -f "$d/cuda_runtime_api.h" ] || continue
    if cuda_ok "$d"; then cuda="$d"; echo "cuda_runtime_api.h: $d (ok)"; break; fi
    echo "cuda_runtime_api.h: $d (does not compile, or CUDA < 13)"
  done
  for d in /usr/include /usr/local/include "${CONDA_PREFIX:-}/include" "$INCLUDE"; do
    if xxhash_ok "$d"; then xx="$d"; echo "xxhash.h: $d (ok)"; break; fi
  done
  printf 'CUDA_INC=%q\nXXHASH_INC=%q\n' "$cuda" "$xx" >"$WORK/headers.env"
  local rc=0
  [ -n "$cuda" ] || { echo "no CUDA >= 13 runtime headers: kvpool builds without the CUDA engine"; rc=1; }
  [ -n "$xx" ] || { echo "no usable xxhash.h: kvpool cannot build"; rc=1; }
  return $rc
}

step_venv() {
  rm -rf "$VENV"
  if ! "$PY" -m venv --system-site-packages "$VENV"; then
    echo "venv with pip failed (no ensurepip?); trying --without-pip"
    rm -rf "$VENV"
    "$PY" -m venv --system-site-packages --without-pip "$VENV" || return 1
  fi
  local site
  site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  # The chosen interpreter's own site-packages after the venv's (torch, pybind11, cmake, ...).
  site_dirs "$PY" >"$site/zz_device_check_host.pth"
  echo "venv $VENV (python $("$VENV/bin/python" -V 2>&1)); host site dirs:"
  cat "$site/zz_device_check_host.pth"
  if ! "$VENV/bin/python" -m pip --version; then
    local whl
    whl="$(find "$WHEELS" -maxdepth 1 -name 'pip-*.whl' 2>/dev/null | head -1)"
    [ -n "$whl" ] || { echo "no pip in the venv and no carried pip wheel"; return 1; }
    "$VENV/bin/python" "$whl/pip" install --no-index --find-links "$WHEELS" pip || return 1
  fi
  "$VENV/bin/python" -c 'import torch; print("torch", torch.__version__, "from", torch.__file__)' \
    || echo "torch does not import in the venv (the GPU steps will say so)"
}

step_deps() {
  local -a src=()
  if [ -d "$WHEELS" ]; then src=(--no-index --find-links "$WHEELS"); fi
  echo "pip install ${src[*]} ${DEPS[*]}"
  "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input "${src[@]}" "${DEPS[@]}"
}

step_build() {
  # shellcheck disable=SC1091
  . "$WORK/headers.env"
  local -a defs=()
  if [ -n "$CUDA_INC" ]; then
    defs+=("-Ccmake.define.KVPOOL_CUDA_INCLUDE_DIR=$CUDA_INC" "-Ccmake.define.KVPOOL_WITH_CUDA=ON")
  fi
  [ -n "$XXHASH_INC" ] && defs+=("-Ccmake.define.KVPOOL_XXHASH_INCLUDE_DIR=$XXHASH_INC")
  local pyb
  if pyb="$("$VENV/bin/python" -m pybind11 --cmakedir 2>/dev/null)"; then
    defs+=("-Ccmake.define.pybind11_DIR=$pyb")
  fi
  # The host interpreter's bin (cmake, ninja of its pip packages) after the venv's.
  local host_bin
  host_bin="$(dirname "$PY")"
  export PATH="$VENV/bin:$host_bin:$PATH"
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
  cd "$REPO" || return 1
  echo "pip install --no-build-isolation --no-deps . ${defs[*]}"
  "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input -v \
    --no-build-isolation --no-deps --force-reinstall \
    -Cbuild-dir=build/device-check/build "${defs[@]}" . || return 1
  cd "$WORK" && "$VENV/bin/python" -c 'import kvpool, kvpool._core as c; print("installed", kvpool.__file__, "cuda_built", c.cuda_built())'
}

step_info() {
  cd "$WORK" || return 1
  env -u PYTHONPATH "$VENV/bin/python" - "$OUTDIR/info.json" <<'EOF'
import json, os, shutil, subprocess, sys

info = {"python": sys.version.split()[0]}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                gpu=torch.cuda.is_available())
    if info["gpu"]:
        info["gpu_name"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
except Exception as e:  # noqa: BLE001
    info.update(torch=f"does not import: {e}", gpu=False)
if shutil.which("nvidia-smi"):
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                        "--format=csv,noheader"], capture_output=True, text=True)
    info["nvidia_smi"] = (q.stdout or q.stderr).strip()
import kvpool, kvpool._core, kvpool.copy
info["kvpool"] = kvpool.__file__
info["cuda_built"] = bool(kvpool._core.cuda_built())
info["cuda_available"] = bool(kvpool.copy.cuda_available())
info["cuda_unavailable_reason"] = kvpool.copy.cuda_unavailable_reason()
# Without torch loaded first, kvpool must find libcudart.so.13 by itself.
probe = subprocess.run([sys.executable, "-c",
    "import kvpool.copy as c; print(c.cuda_unavailable_reason() or 'available')"],
    capture_output=True, text=True)
info["cuda_without_torch"] = (probe.stdout or probe.stderr).strip()
json.dump(info, open(sys.argv[1], "w"), indent=1)
for k, v in info.items():
    print(f"{k:24} {v}")
if not info["kvpool"].startswith(sys.prefix):
    sys.exit(f"kvpool imports from {info['kvpool']}, not from the venv {sys.prefix}")
if info["gpu"] and not info["cuda_available"]:
    sys.exit(f"torch sees a GPU but kvpool's CUDA engine is unavailable: "
             f"{info['cuda_unavailable_reason']}")
EOF
}

step_pytest() {
  local t="$WORK/tests"
  rm -rf "$t" && mkdir -p "$t"
  cp "$REPO/tests/python/conftest.py" "$REPO/tests/python/wire.py" "$REPO/tests/python/test_gpu.py" "$t/"
  cat >"$t/pytest.ini" <<'EOF'
[pytest]
addopts = --strict-markers -ra
xfail_strict = true
markers =
    gpu: needs a CUDA device (skipped without one)
EOF
  cd "$t" || return 1
  env -u PYTHONPATH PATH="$VENV/bin:$PATH" "$VENV/bin/python" -m pytest -m gpu test_gpu.py \
    -p no:cacheprovider -rs -v --junitxml "$OUTDIR/pytest.xml"
  local rc=$?
  # pytest's rc, judged with the counts: a skip is a pass only where torch sees no GPU.
  "$VENV/bin/python" - "$OUTDIR/pytest.xml" "$OUTDIR/info.json" "$rc" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
rc = int(sys.argv[3])
try:
    root = ET.parse(sys.argv[1]).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
except Exception as e:  # noqa: BLE001
    sys.exit(f"no junit report: {e}")
try:
    gpu = json.load(open(sys.argv[2])).get("gpu", False)
except Exception:  # noqa: BLE001
    gpu = False
print("pytest", counts, "gpu", gpu, "rc", rc)
if rc == 5 and not gpu and counts["skipped"] and not counts["failures"] + counts["errors"]:
    print("ok: no GPU here, so the module skipped (pytest's rc 5: no test collected)")
    sys.exit(0)
if rc == 0 and gpu and counts["skipped"]:
    sys.exit(f"{counts['skipped']} skipped although torch sees a GPU")
sys.exit(rc)
EOF
}

step_bench() {
  cd "$REPO" || return 1
  env -u PYTHONPATH "$VENV/bin/python" bench/gpu_copy.py --quick --json-out "$OUTDIR/gpu_copy.json"
}

summary() {
  local py="$VENV/bin/python"
  [ -x "$py" ] || py="$PY"
  "$py" - "$OUTDIR" "$WORK/steps.tsv" "$(( $(date +%s) - START ))" <<'EOF'
import json, os, sys
out, steps_file, total = sys.argv[1], sys.argv[2], int(sys.argv[3])

def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except Exception:  # noqa: BLE001
        return None

steps = []
for line in open(steps_file):
    name, rc, secs, status = line.rstrip("\n").split("\t", 3)
    steps.append({"name": name, "rc": int(rc), "seconds": int(secs), "status": status,
                  "log": f"{name}.log"})
info, bench = load("info.json"), load("gpu_copy.json")
figures = {}
if info:
    figures.update({k: info.get(k) for k in ("gpu_name", "torch", "torch_cuda", "cuda_built",
                    "cuda_available", "cuda_unavailable_reason", "cuda_without_torch")})
if os.path.exists(os.path.join(out, "pytest.xml")):
    import xml.etree.ElementTree as ET
    try:
        root = ET.parse(os.path.join(out, "pytest.xml")).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        figures["pytest"] = {k: int(suite.get(k, 0))
                             for k in ("tests", "failures", "errors", "skipped")}
    except Exception as e:  # noqa: BLE001
        figures["pytest"] = f"unreadable: {e}"
if bench:
    if not bench.get("available"):
        figures["bench"] = f"no GPU: {bench.get('reason')}"
    elif "error" in bench:
        figures["bench"] = f"error: {bench['error']}"
    else:
        figures["bench"] = [
            {k: (round(r[k], 3) if isinstance(r[k], float) else r[k])
             for k in ("tokens", "gather_gbps", "memcpy_d2h_gbps", "gather_ratio",
                       "gather_pass", "scatter_gbps", "memcpy_h2d_gbps", "scatter_ratio",
                       "scatter_pass")}
            for r in bench["rows"]]
failed = [s["name"] for s in steps if s["status"] != "ok"]
report = {"ok": not failed, "failed": failed, "seconds": total, "steps": steps,
          "figures": figures}
json.dump(report, open(os.path.join(out, "device_check.json"), "w"), indent=1)
print("== Summary")
for s in steps:
    print(f"  {s['name']:8} {s['status']:28} rc {s['rc']:<4} {s['seconds']:>4}s")
for k, v in figures.items():
    if k == "bench" and isinstance(v, list):
        print("  bench (GB/s):  tokens  gather/D2H  ratio        scatter/H2D  ratio")
        for r in v:
            print(f"  {'':13} {r['tokens']:>6}  {r['gather_gbps']:6.2f}/{r['memcpy_d2h_gbps']:<6.2f}"
                  f" {r['gather_ratio']:.2f}x {'PASS' if r['gather_pass'] else 'MISS'}"
                  f"   {r['scatter_gbps']:6.2f}/{r['memcpy_h2d_gbps']:<6.2f}"
                  f" {r['scatter_ratio']:.2f}x {'PASS' if r['scatter_pass'] else 'MISS'}")
    else:
        print(f"  {k:24} {v}")
print(f"  {'result':24} {'ok' if not failed else 'FAILED: ' + ', '.join(failed)} ({total}s)")
print(f"  {'report':24} {os.path.join(out, 'device_check.json')}")
sys.exit(1 if failed else 0)
EOF
}

step_limit() {
  case "$1" in info) echo 60 ;; pytest) echo 150 ;; bench) echo 150 ;; *) echo 60 ;; esac
}

skip_step() {  # NAME WHY
  log "$1: skipped ($2)"
  printf '%s\t%s\t%s\t%s\n' "$1" -1 0 "skipped ($2)" >>"$WORK/steps.tsv"
}

run_step() {  # NAME TIMEOUT_S: runs `__step NAME` under timeout, records it in steps.tsv
  local name="$1" limit="$2" left t0 rc status
  left=$(( DEADLINE - $(date +%s) ))
  if (( left < 10 )); then
    log "$name: skipped, the ${BUDGET}s budget is spent"
    printf '%s\t%s\t%s\t%s\n' "$name" 124 0 "skipped (out of time)" >>"$WORK/steps.tsv"
    return 124
  fi
  (( limit > left )) && limit=$left
  log "$name (timeout ${limit}s) ..."
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" bash "$SELF" __step "$name" >"$OUTDIR/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timeout (${limit}s)" ;;
    *) status=fail ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$status" >>"$WORK/steps.tsv"
  log "$name: $status (rc $rc, $(( $(date +%s) - t0 ))s)"
  if [ "$rc" -ne 0 ]; then
    echo "----- last lines of $name.log"
    tail -n 30 "$OUTDIR/$name.log"
    echo "-----"
  else
    case "$name" in  # the few lines worth seeing in the tool's output
      headers) grep -E '(ok)' "$OUTDIR/$name.log" ;;
      info) cat "$OUTDIR/$name.log" ;;
      pytest) grep -E '^(SKIPPED|FAILED|ERROR)|passed|failed|skipped' "$OUTDIR/$name.log" | tail -n 8 ;;
      bench) grep -vE '^\[bench' "$OUTDIR/$name.log" ;;
    esac
  fi
  return "$rc"
}

pick_python() {
  local c
  if [ -n "${PYTHON:-}" ]; then command -v "$PYTHON" && return 0; echo "PYTHON=$PYTHON not found" >&2; return 1; fi
  for c in python3 python3.12 python; do
    if command -v "$c" >/dev/null && "$c" -c 'import torch' 2>/dev/null; then command -v "$c"; return 0; fi
  done
  for c in python3 python3.12 python; do
    if command -v "$c" >/dev/null; then command -v "$c"; return 0; fi
  done
  return 1
}

main() {
  OUTDIR="$(mkdir -p "$1" && cd "$1" && pwd)" || { echo "cannot create $1" >&2; exit 2; }
  START=$(date +%s)
  BUDGET="${DEVICE_CHECK_BUDGET_S:-470}"
  DEADLINE=$(( START + BUDGET ))
  WORK="${DEVICE_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/kvpool-device-check.XXXXXX")}"
  mkdir -p "$WORK" && : >"$WORK/steps.tsv"
  VENV="$WORK/venv"
  PY="$(pick_python)" || { echo "no python3 found" >&2; exit 2; }
  export OUTDIR WORK VENV PY
  log "repo $REPO, out $OUTDIR, work $WORK, python $PY ($("$PY" -V 2>&1)), budget ${BUDGET}s"
  log "carried: wheels $([ -d "$WHEELS" ] && echo yes || echo no), include $([ -d "$INCLUDE" ] && echo yes || echo no); $(nproc) CPUs"
  run_step headers 60
  local ok=1 s
  run_step venv 90 || ok=0
  if (( ok )); then
    run_step deps 150
    run_step build "${DEVICE_CHECK_BUILD_TIMEOUT_S:-300}" || ok=0
  else
    skip_step deps "no venv"
    skip_step build "no venv"
  fi
  for s in info pytest bench; do
    if (( ok )); then run_step "$s" "$(step_limit "$s")"; else skip_step "$s" "nothing installed"; fi
  done
  summary
}

case "${1:-}" in
  --prepare) prepare ;;
  __step)
    case "${2:-}" in
      headers) step_headers ;;
      venv) step_venv ;;
      deps) step_deps ;;
      build) step_build ;;
      info) step_info ;;
      pytest) step_pytest ;;
      bench) step_bench ;;
      *) echo "unknown step ${2:-}" >&2; exit 2 ;;
    esac
    ;;
  ""|-h|--help) sed -n '2,/^set -uo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; exit 2 ;;
  *) main "$1" ;;
esac
