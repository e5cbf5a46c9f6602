#!/usr/bin/env bash
# Creates (or reuses) the mmvmamba development environment on a CPU machine.
#
#   bash tools/setup_env.sh            # prints nothing else than progress
#   source "$(bash tools/setup_env.sh --print-activate)"
#
# Environment:  MMVMAMBA_ENV (default ~/.cache/mmvmamba/venv): the virtualenv.
#               MMVMAMBA_WHEELS (default ~/.cache/mmvmamba/wheels): cached mmcv wheel.
#               MMVMAMBA_LOGS (default ~/.cache/mmvmamba/logs): build logs.
#               MMVMAMBA_BUILD_EXT, MMVMAMBA_WITH_CUDA, MAX_JOBS: see setup.py.
# Needs Python >= 3.9 with its venv module, a C++ compiler (g++ >= 10: torch
# 2.14's headers are C++20) and a package index (PyPI, or the mirror pip is
# configured for). It installs the stack of requirements/: torch 2.14.1 +
# torchvision 0.29.1, mmcv 2.1.0 built from source with its CPU ops (cached as
# a wheel, ~8 min once), mmengine 0.10.7, mmdet 3.3.0, mmsegmentation 1.2.2,
# mmpretrain 1.2.0; then this checkout, editable, with its compiled kernels
# (it stops when a compiler is there and mmvmamba._C does not load).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
env_dir="${MMVMAMBA_ENV:-$HOME/.cache/mmvmamba/venv}"
wheel_dir="${MMVMAMBA_WHEELS:-$HOME/.cache/mmvmamba/wheels}"
python="${PYTHON:-python3}"

if [[ "${1:-}" == "--print-activate" ]]; then
    echo "$env_dir/bin/activate"
    exit 0
fi

log() { echo "[setup_env] $*" >&2; }
logs="${MMVMAMBA_LOGS:-$HOME/.cache/mmvmamba/logs}"

# run_logged LOG WHAT COMMAND...: run COMMAND with its whole output in LOG,
# saying every 30 s how long it has run and the last [n/m] step ninja printed;
# on failure, show the end of LOG and return COMMAND's status.
run_logged() {
    local out=$1 what=$2 start=$SECONDS pid rc=0 ticks=0 progress
    shift 2
    mkdir -p "$(dirname "$out")"
    log "$what (output: $out)"
    "$@" > "$out" 2>&1 &
    pid=$!
    trap 'kill "$pid" 2>/dev/null' EXIT
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        ticks=$((ticks + 1))
        if ((ticks % 30 == 0)) && kill -0 "$pid" 2>/dev/null; then
            progress="$(grep -aoE '^ *\[[0-9]+/[0-9]+\]' "$out" | tail -n 1 | tr -d ' ' || true)"
            log "  $what: $((SECONDS - start)) s${progress:+, ninja $progress}"
        fi
    done
    wait "$pid" || rc=$?
    trap - EXIT
    if [[ $rc -ne 0 ]]; then
        tail -n 30 "$out" >&2
        log "$what failed (exit $rc after $((SECONDS - start)) s); whole output: $out"
        return $rc
    fi
    log "  $what: done in $((SECONDS - start)) s"
}

# pip >= 21.3 installs editable projects through PEP 660 (pyproject.toml),
# which builds mmvmamba._C with this environment's torch.
pip_at_least_21_3() {
    python -c 'import sys, pip; sys.exit(tuple(map(int, pip.__version__.split(".")[:2])) < (21, 3))'
}

stamp="$env_dir/.mmvmamba-stack"
want_stamp="$(cat "$repo/requirements/runtime.txt" "$repo/requirements/stack.txt" \
    "$repo/requirements/tests.txt" | sha1sum | cut -d' ' -f1)"

if [[ ! -x "$env_dir/bin/python" ]]; then
    log "creating virtualenv $env_dir"
    "$python" -m venv "$env_dir"
fi
# shellcheck disable=SC1091
source "$env_dir/bin/activate"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want_stamp" ]]; then
    log "reusing the stack in $env_dir"
else
    log "installing the OpenMMLab stack into $env_dir"
    if ! pip_at_least_21_3; then
        log "pip $(pip --version | cut -d' ' -f2) predates editable installs through pyproject.toml: upgrading it"
        pip install -q --upgrade "pip>=21.3"
    fi
    # mmcv's setup.py and mmengine need pkg_resources (gone in setuptools 82).
    pip install -q "setuptools>=77.0.3,<81" wheel ninja
    pip install -q -r "$repo/requirements/torch.txt"

    py_tag="$(python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
    torch_ver="$(python -c 'import torch; print(torch.__version__.split("+")[0])')"
    mmcv_cache="$wheel_dir/mmcv-2.1.0-torch$torch_ver-$py_tag"
    if ! ls "$mmcv_cache"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
        log "building mmcv 2.1.0 with CPU ops (about 8 minutes on 2 cores, cached in $mmcv_cache)"
        build="$(mktemp -d)"
        pip download -q --no-deps --no-build-isolation --no-binary :all: -d "$build" mmcv==2.1.0
        tar -xzf "$build"/mmcv-2.1.0.tar.gz -C "$build"
        # torch >= 2.14 headers require C++20.
        sed -i 's/-std=c++17/-std=c++20/g' "$build/mmcv-2.1.0/setup.py"
        mkdir -p "$mmcv_cache"
        (cd "$build/mmcv-2.1.0" && CUDA_VISIBLE_DEVICES= FORCE_CUDA=0 MMCV_WITH_OPS=1 \
            MAX_JOBS=2 CFLAGS=-g0 CXXFLAGS=-g0 run_logged "$logs/mmcv-build.log" \
            "mmcv build" pip wheel -v --no-deps --no-build-isolation -w "$mmcv_cache" .)
        rm -rf "$build"
    else
        log "using cached mmcv wheel from $mmcv_cache"
    fi
    pip install -q "$mmcv_cache"/mmcv-2.1.0-*.whl
    pip install -q -r "$repo/requirements/stack.txt" -r "$repo/requirements/tests.txt"
    echo "$want_stamp" > "$stamp"
fi

# The project itself, editable. It compiles csrc/ (CPU kernels, and CUDA ones
# when torch is a CUDA build and nvcc is found; MMVMAMBA_BUILD_EXT=0 skips
# it); skipped when this checkout, setup.py, pyproject.toml and csrc/ are
# unchanged since the last install and the extension loads. It stops when a
# C++ compiler is there but mmvmamba._C does not load.
check_extension() {  # the installed package: from outside the checkout,
    # without a PYTHONPATH that could name another checkout's mmvmamba
    (cd / && env -u PYTHONPATH python -c 'import sys; from mmvmamba.ops._ext import check_extension; sys.exit(check_extension("setup_env"))')
}
if [[ -f "$repo/setup.py" ]]; then
    project_stamp="$env_dir/.mmvmamba-project"
    want_project="$( (echo "$repo ${MMVMAMBA_BUILD_EXT:-1} ${MMVMAMBA_WITH_CUDA:-1}"; \
        cat "$repo/setup.py" "$repo/pyproject.toml"; \
        find "$repo/csrc" -type f | sort | xargs cat) \
        | sha1sum | cut -d' ' -f1)"
    if [[ -f "$project_stamp" && "$(cat "$project_stamp")" == "$want_project" ]] \
        && check_extension > /dev/null 2>&1; then
        log "mmvmamba already installed from $repo"
    else
        rm -f "$project_stamp"
        log "installing mmvmamba (editable) from $repo"
        MAX_JOBS="${MAX_JOBS:-2}" run_logged "$logs/mmvmamba-build.log" \
            "mmvmamba build" pip install -v --no-deps --no-build-isolation -e "$repo"
        grep -aE '^ *\[mmvmamba setup\]' "$logs/mmvmamba-build.log" | sed 's/^ *//' | awk '!seen[$0]++' >&2 || true
        if ! check_extension >&2; then
            log "the build's whole output: $logs/mmvmamba-build.log"
            exit 1
        fi
        echo "$want_project" > "$project_stamp"
    fi
fi
log "ready: source $env_dir/bin/activate"
