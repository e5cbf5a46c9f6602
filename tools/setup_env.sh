#!/usr/bin/env bash
# Creates (or reuses) the mmvmamba development environment on a CPU machine.
#
#   bash tools/setup_env.sh            # prints nothing else than progress
#   source "$(bash tools/setup_env.sh --print-activate)"
#
# Environment:  MMVMAMBA_ENV (default ~/.cache/mmvmamba/venv): the virtualenv.
#               MMVMAMBA_WHEELS (default ~/.cache/mmvmamba/wheels): cached mmcv wheel.
# The stack follows shared/ENVIRONMENT.md: torch 2.14.1 + torchvision 0.29.1,
# mmcv 2.1.0 built from source with its CPU ops (cached as a wheel, ~8 min once),
# mmengine 0.10.7, mmdet 3.3.0, mmsegmentation 1.2.2, mmpretrain 1.2.0.
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
    pip install -q --upgrade pip
    # mmcv's setup.py and mmengine need pkg_resources (gone in setuptools 82).
    pip install -q "setuptools>=77.0.3,<81" wheel ninja
    pip install -q -r "$repo/requirements/torch.txt"

    py_tag="$(python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
    torch_ver="$(python -c 'import torch; print(torch.__version__.split("+")[0])')"
    mmcv_cache="$wheel_dir/mmcv-2.1.0-torch$torch_ver-$py_tag"
    if ! ls "$mmcv_cache"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
        log "building mmcv 2.1.0 with CPU ops (about 8 minutes, cached in $mmcv_cache)"
        build="$(mktemp -d)"
        pip download -q --no-deps --no-build-isolation --no-binary :all: -d "$build" mmcv==2.1.0
        tar -xzf "$build"/mmcv-2.1.0.tar.gz -C "$build"
        # torch >= 2.14 headers require C++20.
        sed -i 's/-std=c++17/-std=c++20/g' "$build/mmcv-2.1.0/setup.py"
        mkdir -p "$mmcv_cache"
        (cd "$build/mmcv-2.1.0" && CUDA_VISIBLE_DEVICES= FORCE_CUDA=0 MMCV_WITH_OPS=1 \
            MAX_JOBS=2 CFLAGS=-g0 CXXFLAGS=-g0 \
            pip wheel -q --no-deps --no-build-isolation -w "$mmcv_cache" .)
        rm -rf "$build"
    else
        log "using cached mmcv wheel from $mmcv_cache"
    fi
    pip install -q "$mmcv_cache"/mmcv-2.1.0-*.whl
    pip install -q -r "$repo/requirements/stack.txt" -r "$repo/requirements/tests.txt"
    echo "$want_stamp" > "$stamp"
fi

# The project itself, editable. It compiles csrc/ when torch is a CUDA build
# and nvcc is found (MMVMAMBA_BUILD_EXT=0 skips it); skipped when this
# checkout, setup.py and csrc/ are unchanged since the last install and the
# built library is in place.
if [[ -f "$repo/setup.py" ]]; then
    project_stamp="$env_dir/.mmvmamba-project"
    want_project="$( (echo "$repo ${MMVMAMBA_BUILD_EXT:-1}"; \
        cat "$repo/setup.py" "$repo"/csrc/* 2>/dev/null) | sha1sum | cut -d' ' -f1)"
    if [[ -f "$project_stamp" && "$(cat "$project_stamp")" == "$want_project" ]] \
        && (cd / && python -c 'import mmvmamba, mmvmamba._C') 2>/dev/null; then
        log "mmvmamba already installed from $repo"
    else
        log "installing mmvmamba (editable) from $repo"
        MAX_JOBS="${MAX_JOBS:-2}" pip install -q --no-deps --no-build-isolation -e "$repo"
        echo "$want_project" > "$project_stamp"
    fi
fi
log "ready: source $env_dir/bin/activate"
