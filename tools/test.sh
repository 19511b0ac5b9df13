#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian/Ubuntu machine, then run it.
#   bash tools/test.sh            # the whole suite
#   bash tools/test.sh -k spine   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

# The ARM tests cross-compile with Debian's aarch64 g++ and run the result under qemu-user.
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  if ! command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || ! command -v qemu-aarch64 >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++-aarch64-linux-gnu qemu-user >/dev/null
  fi
fi

python -m pip install -q -e ".[test]"
# An aarch64 Python + TVM runtime (Debian arm64 packages and PyPI aarch64 wheels) for qemu.
python tools/run_on_qemu_aarch64.py setup >/dev/null || echo "warning: no aarch64 qemu environment; its test will skip"

# The suite on up to 4 cores at once (pytest-xdist; the tests of one slow session fixture share a
# worker), then, alone, the tests that measure the CPU's load or a speed (marked serial). Status 5 is pytest's
# "no tests selected" (the extra arguments chose none of that part): not a failure.
workers=$(python -c "import os; print(min(4, len(os.sched_getaffinity(0))))")
run_pytest() { python -m pytest -q "$@" || { status=$?; [ "$status" = 5 ] || exit "$status"; }; }
run_pytest -n "$workers" --dist loadgroup -m "not serial" "$@"
run_pytest -m serial "$@"
