#!/usr/bin/env bash
# Real-scale check of tools/train.py, tools/test.py and tools/dist_*.sh on
# GPUs, with the real Mask R-CNN and UperNet VMamba-T configs on synthetic
# COCO / ADE20K data (nothing is downloaded; no ImageNet weights).
#
#   bash tools/gpu_check.sh MODE WORK_DIR [TASK ...]
#
#   MODE     single   1 GPU: per task, ITERS iterations with --amp and
#                     FP32_ITERS without, at the configs' full scale (COCO
#                     images resized to 800x800, ADE 512x512 crops), then
#                     tools/test.py on the AMP checkpoint (COCO bbox/segm
#                     mAP; mIoU, also with --tta); no loss may be NaN/Inf
#            compare  GPUS GPUs (any number, 1 too): per task,
#                     COMPARE_ITERS iterations once on one GPU with batch
#                     2 x GPUS (tools/train.py) and once on GPUS GPUs with
#                     batch 2 each (tools/dist_train.sh):
#                     same seed, data and order, nothing drawn per process
#                     that changes the loss (tools/gpu_check/cfg_options.py
#                     says what that takes); the logged losses (GPUS GPUs:
#                     the mean over the ranks, by MeanLossAcrossRanksHook)
#                     must agree within TOL at every iteration (tools/
#                     analysis/compare_losses.py); then tools/dist_test.sh
#                     on the GPUS-GPU checkpoint
#            long     1 GPU: per task, LONG_ITERS iterations with --amp at
#                     full scale: no loss NaN/Inf, the mean loss of the
#                     last 50 iterations below that of the first 50, and
#                     the number of steps the loss scaler skipped (optimizer
#                     steps taken, from the last checkpoint, against
#                     iterations) and its final scale, reported
#            scaling  per task and GPU count N of SCALING_GPUS, training
#                     throughput: SCALING_ITERS iterations of tools/
#                     dist_train.sh CONFIG N (N = 1 too) with batch 2 per
#                     GPU, the configs' settings but no validation; img/s
#                     from the median iteration time over iterations
#                     SCALING_FIRST..SCALING_LAST and the scaling
#                     efficiency img/s(N) / (N x img/s(1)), as a markdown
#                     table (tools/gpu_check/throughput.py)
#            all      single, then compare (long and scaling run on their
#                     own)
#   WORK_DIR data, checkpoints and logs: WORK_DIR/logs/STEP.log holds each
#            step's whole output, WORK_DIR/summary.txt the results
#   TASK     det (Mask R-CNN) and/or seg (UperNet); default both
#
# Environment [default]:
#   ITERS [200], FP32_ITERS [20], COMPARE_ITERS [20], LONG_ITERS [1000]
#                       iterations of the runs
#   LONG_EPOCHS [5]     long mode: Mask R-CNN's epochs over LONG_ITERS x 2 /
#                       LONG_EPOCHS images, UperNet's checkpoints (each must
#                       divide LONG_ITERS)
#   GPUS [2]            compare mode: GPUs of the distributed run;
#                       scaling mode: the largest count of SCALING_GPUS
#   SCALING_GPUS [1 2 4 ... up to GPUS]  scaling mode: the GPU counts
#   SCALING_ITERS [150] scaling mode: iterations of each run
#   SCALING_FIRST [50], SCALING_LAST [SCALING_ITERS]  scaling mode: the
#                       iterations (both included) of the median
#   TOL [0.05]          largest relative difference of the compared losses
#   WARMUP [by task]    compare mode: the learning-rate warm-up, off (the
#                       base rate from the first iteration) or keep; by
#                       default keep for det, off for seg (tools/
#                       gpu_check/cfg_options.py says why)
#   NUM_WORKERS [2]     data workers per process
#   PORT [29500]        of tools/dist_*.sh
#   COCO_SIZE [800], ADE_SIZE [512]  sides of the synthetic images
#   VERBOSE [0]         1: also stream each step's output
#   PREFLIGHT_TIMEOUT [300]  seconds the preflight (imports, GPUs, mmcv's
#                       CUDA ops) may take
#   DET_CONFIG, SEG_CONFIG [the T configs]; VMamba2: DET_CONFIG=configs/
#                       mask_rcnn_vmamba2_t_1x_coco.py SEG_CONFIG=configs/
#                       upernet_vmamba2_t_512x512_160k_ade20k.py
#   EXTRA_OPTS []       more --cfg-options for every training and test run
#   SMOKE_CPU [0]       1: try the script itself on a CPU machine (single
#                       or long mode, no --amp), e.g. SMOKE_CPU=1 ITERS=2
#                       FP32_ITERS=2 COCO_SIZE=64 ADE_SIZE=64
#                       DET_CONFIG=configs/demo/mask_rcnn_vmamba_demo_synthetic.py
#                       SEG_CONFIG=configs/demo/upernet_vmamba_demo_synthetic.py
# It runs the `python` first on PATH, which needs torch with CUDA, mmcv with
# its CUDA ops, mmengine, mmdet and mmseg; mmvmamba comes from this checkout
# (PYTHONPATH). Exit status 0 when every step passed, 1 when one failed, 2
# when it could not start.
set -uo pipefail

usage() {  # the comment above
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' \
        "${BASH_SOURCE[0]}"
    exit 2
}
[[ $# -ge 2 ]] || usage
mode=$1
case "$mode" in single | compare | long | scaling | all) ;; *) usage ;; esac
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work_arg=$2
shift 2
tasks=("$@")
[[ ${#tasks[@]} -gt 0 ]] || tasks=(det seg)
for task in "${tasks[@]}"; do
    [[ "$task" == det || "$task" == seg ]] ||
        { echo "unknown task '$task' (det or seg)" >&2; exit 2; }
done

ITERS="${ITERS:-200}"
FP32_ITERS="${FP32_ITERS:-20}"
COMPARE_ITERS="${COMPARE_ITERS:-20}"
LONG_ITERS="${LONG_ITERS:-1000}"
LONG_EPOCHS="${LONG_EPOCHS:-5}"
GPUS="${GPUS:-2}"
[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || { echo "GPUS must be a positive integer, got '$GPUS'" >&2; exit 2; }
default_scaling=1
for ((n = 2; n <= GPUS; n *= 2)); do default_scaling+=" $n"; done
SCALING_GPUS="${SCALING_GPUS:-$default_scaling}"
read -r -a scaling_gpus <<< "${SCALING_GPUS//,/ }"
max_scaling=0
for n in "${scaling_gpus[@]}"; do
    [[ "$n" =~ ^[1-9][0-9]*$ && " ${scaling_gpus[*]} " != *" $n "*" $n "* ]] ||
        { echo "SCALING_GPUS must be distinct GPU counts (positive integers, e.g. '1 2 4'), got '$SCALING_GPUS'" >&2; exit 2; }
    ((n > max_scaling)) && max_scaling=$n
done
((max_scaling > 0)) || { echo "SCALING_GPUS names no GPU count: '$SCALING_GPUS'" >&2; exit 2; }
SCALING_ITERS="${SCALING_ITERS:-150}"
SCALING_FIRST="${SCALING_FIRST:-50}"
SCALING_LAST="${SCALING_LAST:-$SCALING_ITERS}"
TOL="${TOL:-0.05}"
NUM_WORKERS="${NUM_WORKERS:-2}"
export PORT="${PORT:-29500}"
WARMUP="${WARMUP:-}"
COCO_SIZE="${COCO_SIZE:-800}"
ADE_SIZE="${ADE_SIZE:-512}"
VERBOSE="${VERBOSE:-0}"
SMOKE_CPU="${SMOKE_CPU:-0}"
PREFLIGHT_TIMEOUT="${PREFLIGHT_TIMEOUT:-300}"
for name in ITERS FP32_ITERS COMPARE_ITERS SCALING_ITERS SCALING_FIRST \
    SCALING_LAST LONG_ITERS LONG_EPOCHS COCO_SIZE ADE_SIZE PREFLIGHT_TIMEOUT \
    PORT; do
    [[ "${!name}" =~ ^[1-9][0-9]*$ ]] ||
        { echo "$name must be a positive integer, got '${!name}'" >&2; exit 2; }
done
[[ "$NUM_WORKERS" =~ ^[0-9]+$ ]] ||
    { echo "NUM_WORKERS must be an integer >= 0, got '$NUM_WORKERS'" >&2; exit 2; }
[[ "$TOL" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]] ||
    { echo "TOL must be a number >= 0 (e.g. 0.05), got '$TOL'" >&2; exit 2; }
[[ -z "$WARMUP" || "$WARMUP" == keep || "$WARMUP" == off ]] ||
    { echo "WARMUP must be keep or off (or unset), got '$WARMUP'" >&2; exit 2; }
for name in VERBOSE SMOKE_CPU; do
    [[ "${!name}" == 0 || "${!name}" == 1 ]] ||
        { echo "$name must be 0 or 1, got '${!name}'" >&2; exit 2; }
done
((LONG_ITERS % LONG_EPOCHS == 0)) ||
    { echo "LONG_EPOCHS ($LONG_EPOCHS) must divide LONG_ITERS ($LONG_ITERS)" >&2; exit 2; }
((SCALING_FIRST <= SCALING_LAST && SCALING_LAST <= SCALING_ITERS)) ||
    { echo "need SCALING_FIRST ($SCALING_FIRST) <= SCALING_LAST ($SCALING_LAST) <= SCALING_ITERS ($SCALING_ITERS)" >&2; exit 2; }
DET_CONFIG="${DET_CONFIG:-configs/mask_rcnn_vmamba_t_1x_coco.py}"
SEG_CONFIG="${SEG_CONFIG:-configs/upernet_vmamba_t_512x512_160k_ade20k.py}"
read -r -a extra_opts <<< "${EXTRA_OPTS:-}"
for name in DET_CONFIG SEG_CONFIG; do  # paths from the checkout's root
    (cd "$repo" && [[ -f "${!name}" ]]) ||
        { echo "$name: no config file at '${!name}'" >&2; exit 2; }
done
mkdir -p "$work_arg" || exit 2  # after the checks: nothing written before
work="$(cd "$work_arg" && pwd)"

cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
warnings=ignore::UserWarning,ignore::DeprecationWarning
export PYTHONWARNINGS="${PYTHONWARNINGS:-$warnings}"
export PYTHONUNBUFFERED=1
data="$work/synthetic"
logs="$work/logs"
summary="$work/summary.txt"
mkdir -p "$logs"
: > "$summary"
failures=0

section() { printf '\n==================== %s\n' "$*"; }
note() { echo "$*" | tee -a "$summary"; }
fail() { note "FAIL $*"; failures=$((failures + 1)); }

# step NAME COMMAND...: run COMMAND with its whole output in logs/NAME.log
# (and on the terminal with VERBOSE=1); on failure show the log's end.
# Returns COMMAND's status.
step() {
    local name=$1 log="$logs/$1.log" start=$SECONDS rc
    shift
    echo "---- $name: $*"
    echo "+ $*" > "$log"
    if [[ "$VERBOSE" == 1 ]]; then
        "$@" 2>&1 | tee -a "$log"
        rc=${PIPESTATUS[0]}
    else
        "$@" >> "$log" 2>&1
        rc=$?
    fi
    if [[ $rc -eq 0 ]]; then
        note "ok   $name ($((SECONDS - start)) s)"
    else
        [[ "$VERBOSE" == 1 ]] || tail -n 40 "$log"
        fail "$name (exit $rc after $((SECONDS - start)) s; log: $log)"
    fi
    return $rc
}

# options VAR ARGS...: the checked --cfg-options that
# `python tools/gpu_check/cfg_options.py ARGS` prints, then EXTRA_OPTS
options() {
    local -n into=$1
    shift
    local text
    text="$(python tools/gpu_check/cfg_options.py "$@")" || return 1
    mapfile -t into <<< "$text"
    into+=("${extra_opts[@]}")
}

# losses NAME WORK_DIR ITERS: every loss finite, ITERS iterations logged
losses() {
    step "$1" python tools/gpu_check/check_losses.py "$2" --min-iters "$3" &&
        note "     $(tail -n 1 "$logs/$1.log")"
}

# metrics NAME TEST_WORK_DIR: the metrics tools/test.py saved, all finite
metrics() {
    step "$1" python tools/gpu_check/cfg_options.py metrics "$2" &&
        note "     $(tail -n 1 "$logs/$1.log")"
}

config_of() {
    if [[ $1 == det ]]; then echo "$DET_CONFIG"; else echo "$SEG_CONFIG"; fi
}

run_single() {
    local task=$1 config out ckpt amp=() fp32=() test=()
    local -x CUDA_VISIBLE_DEVICES="${SINGLE_GPU:-0}"
    config="$(config_of "$task")"
    out="$work/single/$task"
    section "single GPU, $task: $config"
    rm -rf "$out"
    options amp train "$task" --config "$config" --mode single \
        --iters "$ITERS" --batch-size 2 --data-root "$data" \
        --workers "$NUM_WORKERS" &&
        options fp32 train "$task" --config "$config" --mode single \
            --iters "$FP32_ITERS" --batch-size 2 --data-root "$data" \
            --workers "$NUM_WORKERS" &&
        options test test "$task" --config "$config" --data-root "$data" \
            --workers "$NUM_WORKERS" ||
        { fail "$task: no options"; return; }
    if step "$task-train-amp" python tools/train.py "$config" \
        "${amp_flag[@]}" --work-dir "$out/amp" --cfg-options "${amp[@]}"; then
        losses "$task-losses-amp" "$out/amp" "$ITERS"
        ckpt="$(cat "$out/amp/last_checkpoint")"
        step "$task-test" python tools/test.py "$config" "$ckpt" \
            --work-dir "$out/test" --cfg-options "${test[@]}" &&
            metrics "$task-test-metrics" "$out/test"
        if [[ $task == seg ]]; then
            step "$task-test-tta" python tools/test.py "$config" "$ckpt" \
                --tta --work-dir "$out/test-tta" \
                --cfg-options "${test[@]}" &&
                metrics "$task-test-tta-metrics" "$out/test-tta"
        fi
    fi
    step "$task-train-fp32" python tools/train.py "$config" \
        --work-dir "$out/fp32" --cfg-options "${fp32[@]}" &&
        losses "$task-losses-fp32" "$out/fp32" "$FP32_ITERS"
}

run_compare() {
    local task=$1 config out ckpt one=() two=() test=() devices
    local global=$((2 * GPUS)) many="${GPUS}gpu"
    devices="$(seq -s, 0 $((GPUS - 1)))"
    config="$(config_of "$task")"
    out="$work/compare/$task"
    section "1 GPU x batch $global against $GPUS GPUs x batch 2, $task: $config"
    rm -rf "$out"
    options one train "$task" --config "$config" --mode compare \
        --iters "$COMPARE_ITERS" --batch-size "$global" --global-batch "$global" \
        --data-root "$data" --workers "$NUM_WORKERS" ${WARMUP:+--warmup "$WARMUP"} &&
        options two train "$task" --config "$config" --mode compare \
            --iters "$COMPARE_ITERS" --batch-size 2 --global-batch "$global" \
            --data-root "$data" --workers "$NUM_WORKERS" ${WARMUP:+--warmup "$WARMUP"} &&
        options test test "$task" --config "$config" --data-root "$data" \
            --workers "$NUM_WORKERS" ||
        { fail "$task: no options"; return; }
    CUDA_VISIBLE_DEVICES=0 step "$task-1gpu-batch$global" python tools/train.py \
        "$config" --work-dir "$out/1gpu" --cfg-options "${one[@]}" || return
    CUDA_VISIBLE_DEVICES="$devices" step "$task-$many-batch2" \
        bash tools/dist_train.sh "$config" "$GPUS" --work-dir "$out/$many" \
        --cfg-options "${two[@]}" || return
    # each loss term, for information; then the verdict on the total loss
    python tools/analysis/compare_losses.py "$out/1gpu" "$out/$many" \
        --iters "$COMPARE_ITERS" --tol "$TOL" --keys all \
        > "$logs/$task-compare-terms.log" 2>&1
    step "$task-compare-losses" python tools/analysis/compare_losses.py \
        "$out/1gpu" "$out/$many" --iters "$COMPARE_ITERS" --tol "$TOL"
    sed '1d' "$logs/$task-compare-losses.log"
    grep -E '^(PASS|FAIL)' "$logs/$task-compare-losses.log" >> "$summary"
    echo "each term, for information (tables: $logs/$task-compare-terms.log):"
    grep -E '^(largest difference|mean of)' "$logs/$task-compare-terms.log" |
        sed 's/^/     /' | tee -a "$summary"
    ckpt="$(cat "$out/$many/last_checkpoint")"
    CUDA_VISIBLE_DEVICES="$devices" step "$task-dist-test" bash tools/dist_test.sh \
        "$config" "$ckpt" "$GPUS" --work-dir "$out/dist-test" \
        --cfg-options "${test[@]}" &&
        metrics "$task-dist-test-metrics" "$out/dist-test"
}

# long_check NAME WORK_DIR ITERS: the loss falls (mean of the last 50
# logged iterations below the first 50's); the loss scaler's skipped steps
# (iterations less the optimizer's steps in the last checkpoint) and scale
long_check() {
    step "$1" python - "$2" "$3" <<'EOF' && note "     $(tail -n 1 "$logs/$1.log")"
import glob
import json
import os.path as osp
import sys

import torch

work, iters = sys.argv[1], int(sys.argv[2])
losses = {}
for path in sorted(glob.glob(osp.join(work, '*', 'vis_data', 'scalars.json'))):
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if 'loss' in row and 'step' in row:
                losses[int(row['step'])] = float(row['loss'])
if len(losses) < iters or len(losses) < 2:
    sys.exit(f'{len(losses)} iterations logged, expected {iters}')
series = [losses[i] for i in sorted(losses)]
window = min(50, len(series) // 2)  # a smoke run's few: half of them
first = sum(series[:window]) / window
last = sum(series[-window:]) / window
with open(osp.join(work, 'last_checkpoint')) as f:
    ckpt = torch.load(f.read().strip(), map_location='cpu', weights_only=False)
state = ckpt['optimizer']
steps = max(int(s['step']) for s in state['state'].values() if 'step' in s)
scaler = state.get('loss_scaler', {})
summary = (f'loss {first:.4f} -> {last:.4f} (means of the first and last '
           f'{window} iterations); loss scaler: {iters - steps} of {iters} '
           f'steps skipped, final scale {scaler.get("scale", "none")}')
if not last < first:
    sys.exit(f'the loss did not fall: {summary}')
print(summary)
EOF
}

run_long() {
    local task=$1 config out opts=()
    local -x CUDA_VISIBLE_DEVICES="${SINGLE_GPU:-0}"
    config="$(config_of "$task")"
    out="$work/long/$task"
    section "long AMP run, 1 GPU, $task: $config ($LONG_ITERS iterations)"
    rm -rf "$out"
    options opts train "$task" --config "$config" --mode long \
        --iters "$LONG_ITERS" --epochs "$LONG_EPOCHS" --batch-size 2 \
        --data-root "$data" --workers "$NUM_WORKERS" ||
        { fail "$task: no options"; return; }
    step "$task-long-amp" python tools/train.py "$config" "${amp_flag[@]}" \
        --work-dir "$out" --cfg-options "${opts[@]}" || return
    losses "$task-long-losses" "$out" "$LONG_ITERS"
    long_check "$task-long-check" "$out" "$LONG_ITERS"
}

# run_scaling TASK: tools/dist_train.sh on each count of SCALING_GPUS; the
# runs that trained go to scaling_runs as TASK:N:WORK_DIR
run_scaling() {
    local task=$1 config out n opts=()
    config="$(config_of "$task")"
    out="$work/scaling/$task"
    rm -rf "$out"
    for n in "${scaling_gpus[@]}"; do
        section "throughput, $n GPU(s) x batch 2, $task: $config ($SCALING_ITERS iterations)"
        options opts train "$task" --config "$config" --mode scaling \
            --iters "$SCALING_ITERS" --batch-size 2 \
            --global-batch $((2 * n)) --data-root "$data" \
            --workers "$NUM_WORKERS" || { fail "$task: no options"; return; }
        CUDA_VISIBLE_DEVICES="$(seq -s, 0 $((n - 1)))" \
            step "$task-scaling-${n}gpu" bash tools/dist_train.sh "$config" \
            "$n" --work-dir "$out/${n}gpu" --cfg-options "${opts[@]}" &&
            scaling_runs+=("$task:$n:$out/${n}gpu")
    done
}

# throughput: the table of tools/gpu_check/throughput.py over scaling_runs,
# into the summary
throughput() {
    section "throughput"
    [[ ${#scaling_runs[@]} -gt 0 ]] || { fail "throughput: no run trained"; return; }
    step scaling-throughput python tools/gpu_check/throughput.py \
        "${scaling_runs[@]}" --first "$SCALING_FIRST" \
        --last "$SCALING_LAST" --batch-per-gpu 2
    sed '1d' "$logs/scaling-throughput.log" | tee -a "$summary"
}

need_gpus=$GPUS need_hint=
[[ "$mode" == single || "$mode" == long ]] && need_gpus=1
if [[ "$mode" == scaling ]]; then
    need_gpus=$max_scaling
    need_hint="SCALING_GPUS='${scaling_gpus[*]}' runs on up to $max_scaling; set SCALING_GPUS (or GPUS) to counts no larger than the GPUs found"
fi
amp_flag=(--amp)
if [[ "$SMOKE_CPU" == 1 ]]; then
    [[ "$mode" == single || "$mode" == long ]] ||
        { echo "SMOKE_CPU=1 runs single or long mode only" >&2; exit 2; }
    need_gpus=0
    amp_flag=()  # CPU autocast is bfloat16, which mmcv's nms refuses
fi

section "preflight ($mode: ${tasks[*]}; work dir $work)"
command -v python > /dev/null || { echo "no 'python' on PATH" >&2; exit 2; }
echo "python: $(command -v python)"
# each stage says when it starts, so that a hang shows where (a timeout of
# PREFLIGHT_TIMEOUT seconds stops it)
if ! timeout "$PREFLIGHT_TIMEOUT" python - "$need_gpus" "${tasks[*]}" "$need_hint" <<'EOF'
import sys

print('preflight: importing torch', flush=True)
import torch

need, tasks, hint = int(sys.argv[1]), sys.argv[2].split(), sys.argv[3]
print('preflight: importing mmcv, mmdet, mmengine, mmseg', flush=True)
import mmcv, mmdet, mmengine, mmseg  # noqa: E401
print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), mmengine '
      f'{mmengine.__version__}, mmcv {mmcv.__version__}, mmdet '
      f'{mmdet.__version__}, mmseg {mmseg.__version__}')
from mmvmamba.ops._ext import ext_status
print(ext_status()[1])
count = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(f'{count} GPU(s): ' + ', '.join(
    torch.cuda.get_device_name(i) for i in range(count)))
if count < need:
    sys.exit(f'this mode needs {need} GPU(s), found {count}' +
             (f': {hint}' if hint else ''))
if 'det' in tasks and need:  # Mask R-CNN runs mmcv's nms and RoIAlign
    print("preflight: running mmcv's CUDA nms and roi_align", flush=True)
    from mmcv.ops import nms, roi_align
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.]]).cuda()
    nms(boxes, torch.tensor([0.9, 0.8]).cuda(), 0.5)
    roi_align(torch.rand(1, 1, 8, 8).cuda(),
              torch.tensor([[0., 0., 0., 4., 4.]]).cuda(), (2, 2))
    print('mmcv CUDA ops: nms and roi_align ran')
EOF
then
    echo "preflight failed" >&2
    exit 2
fi
step verify-options python tools/gpu_check/cfg_options.py verify \
    --configs "$DET_CONFIG" "$SEG_CONFIG" --data-root "$data" || exit 1

section "synthetic data: $data"
# enough training images for the longest Mask R-CNN epoch (iters x batch)
coco_train=$((ITERS * 2))
((FP32_ITERS * 2 > coco_train)) && coco_train=$((FP32_ITERS * 2))
((COMPARE_ITERS * 2 * GPUS > coco_train)) && coco_train=$((COMPARE_ITERS * 2 * GPUS))
[[ "$mode" == long ]] && ((LONG_ITERS * 2 / LONG_EPOCHS > coco_train)) &&
    coco_train=$((LONG_ITERS * 2 / LONG_EPOCHS))
[[ "$mode" == scaling ]] && ((SCALING_ITERS * 2 * max_scaling > coco_train)) &&
    coco_train=$((SCALING_ITERS * 2 * max_scaling))
# without Mask R-CNN a few COCO images do (writing 2,000 at 800x800 takes
# minutes)
[[ " ${tasks[*]} " == *" det "* ]] || coco_train=16
data_args=(--out "$data" --seed 0 --coco-train "$coco_train" --coco-val 16
    --coco-size "$COCO_SIZE" --ade-train 200 --ade-val 16
    --ade-size "$ADE_SIZE")
if [[ -f "$data/.args" && "$(cat "$data/.args")" == "${data_args[*]}" ]]; then
    echo "reusing it (${data_args[*]})"
else
    if [[ -e "$data" && ! -f "$data/.args" ]]; then
        echo "$data exists but was not written by this script: move it" >&2
        exit 2
    fi
    rm -rf "$data"
    step synthetic-data python -m mmvmamba.datasets.synthetic \
        "${data_args[@]}" || exit 1
    echo "${data_args[*]}" > "$data/.args"
fi

if [[ "$mode" == single || "$mode" == all ]]; then
    for task in "${tasks[@]}"; do run_single "$task"; done
fi
if [[ "$mode" == compare || "$mode" == all ]]; then
    for task in "${tasks[@]}"; do run_compare "$task"; done
fi
if [[ "$mode" == long ]]; then
    for task in "${tasks[@]}"; do run_long "$task"; done
fi
if [[ "$mode" == scaling ]]; then
    scaling_runs=()
    for task in "${tasks[@]}"; do run_scaling "$task"; done
    throughput
fi

section "summary (also in $summary)"
cat "$summary"
if [[ $failures -gt 0 ]]; then
    echo "$failures step(s) failed"
    exit 1
fi
echo "all steps passed"
