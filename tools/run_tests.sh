#!/usr/bin/env bash
# The project's test command (README, .ci/run): builds or reuses the
# environment (tools/setup_env.sh), then runs the whole pytest suite on the CPU.
# Extra arguments go to pytest, e.g. `bash tools/run_tests.sh -k backbone`.
# It fails when a C++ compiler is there but mmvmamba._C does not load (the
# kernel tests would all be skipped); MMVMAMBA_ALLOW_NO_EXT=1 runs the tests
# on the PyTorch reference anyway.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/tools/setup_env.sh"
# shellcheck disable=SC1090
source "$(bash "$repo/tools/setup_env.sh" --print-activate)"
cd "$repo"
python -c 'import sys; from mmvmamba.ops._ext import check_extension; sys.exit(check_extension("run_tests"))'
exec python -m pytest -q "$@" tests
