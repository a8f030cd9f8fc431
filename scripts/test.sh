#!/usr/bin/env bash
# Runs every test: C++ unit tests (GoogleTest via ctest), then pytest against real servers.
# Installs what is missing first (scripts/setup.sh). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

echo "== Lint and types"
bash scripts/lint.sh

echo "== C++ tests"
.venv/bin/cmake -S . -B build/tests -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DKVPOOL_BUILD_TESTS=ON -DKVPOOL_BUILD_BENCH=ON -DKVPOOL_BUILD_PYTHON=OFF \
  -DCMAKE_MAKE_PROGRAM="$PWD/.venv/bin/ninja" >/dev/null
.venv/bin/cmake --build build/tests
.venv/bin/ctest --test-dir build/tests --output-on-failure -j2

echo "== Fuzzing (60 s)"
bash scripts/fuzz.sh 60

echo "== Python tests"
PATH="$PWD/.venv/bin:$PATH" .venv/bin/python -m pytest "$@"
