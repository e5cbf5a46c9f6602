#!/usr/bin/env bash
# The project's test command (README, .ci/run): builds or reuses the
# environment (tools/setup_env.sh), then runs the whole pytest suite on the CPU.
# Extra arguments go to pytest, e.g. `bash tools/run_tests.sh -k backbone`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/tools/setup_env.sh"
# shellcheck disable=SC1090
source "$(bash "$repo/tools/setup_env.sh" --print-activate)"
cd "$repo"
python -c 'from mmvmamba.ops._ext import ext_status; print("[run_tests]", ext_status()[1])'
exec python -m pytest -q "$@" tests
