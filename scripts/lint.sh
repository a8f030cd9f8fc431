#!/usr/bin/env bash
# Lint and format-check (ruff, clang-format), type-check, and check that python/kvpool/_core.pyi
# matches the built extension.
# `scripts/lint.sh --fix` rewrites formatting and regenerates the stub instead of failing.
set -euo pipefail
cd "$(dirname "$0")/.."
V=.venv/bin
fix=${1:-}

stubs=$(mktemp -d)
trap 'rm -rf "$stubs"' EXIT
$V/pybind11-stubgen kvpool._core -o "$stubs" >/dev/null
# Normalise the generated stub exactly as the checked-in one is (import order, formatting).
$V/ruff check -q --fix --select I --exit-zero "$stubs/kvpool/_core.pyi"
$V/ruff format -q "$stubs/kvpool/_core.pyi"
cxx=$(git ls-files 'cpp/*.cc' 'cpp/*.h' 'cpp/*.cu' 'tests/cpp/*.cc' 'tests/fuzz/*.cc' 'bench/cpp/*.cc')
if [ "$fix" = "--fix" ]; then
  cp "$stubs/kvpool/_core.pyi" python/kvpool/_core.pyi
  $V/ruff format -q python bench tests/python tests/fuzz
  $V/ruff check -q --fix python bench tests/python tests/fuzz
  # shellcheck disable=SC2086
  $V/clang-format -i $cxx
elif ! diff -q "$stubs/kvpool/_core.pyi" python/kvpool/_core.pyi >/dev/null; then
  echo "lint: python/kvpool/_core.pyi is stale; run scripts/lint.sh --fix" >&2
  diff -u python/kvpool/_core.pyi "$stubs/kvpool/_core.pyi" | head -40 >&2 || true
  exit 1
fi
# shellcheck disable=SC2086
$V/clang-format --dry-run -Werror $cxx  # .clang-format: Google base, 100 columns
$V/ruff check python bench tests/python tests/fuzz
$V/ruff format --check -q python bench tests/python tests/fuzz
$V/mypy
echo "lint: ok"
