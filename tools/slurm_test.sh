#!/usr/bin/env bash
# Test a checkpoint on a Slurm cluster: one srun task per GPU, mmengine's
# slurm launcher (--launcher slurm).
#
#   bash tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [test.py options]
#
# Environment [default]: GPUS [8] tasks (GPUs) in all, GPUS_PER_NODE [8],
# CPUS_PER_TASK [5], SRUN_ARGS [] more srun options, MASTER_PORT [29500] of
# the rank-0 process.
set -euo pipefail
if [[ $# -lt 4 ]]; then
    echo "usage: $0 PARTITION JOB_NAME CONFIG CHECKPOINT [test.py options]" >&2
    echo "  env: GPUS (8), GPUS_PER_NODE (8), CPUS_PER_TASK (5), SRUN_ARGS" >&2
    exit 2
fi
partition=$1
job_name=$2
config=$3
checkpoint=$4
shift 4
gpus=${GPUS:-8}
gpus_per_node=${GPUS_PER_NODE:-8}
read -r -a srun_args <<< "${SRUN_ARGS:-}"
tools="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$tools/launch_checks.sh"
require_count GPUS "$gpus"
require_count GPUS_PER_NODE "$gpus_per_node"
require_count CPUS_PER_TASK "${CPUS_PER_TASK:-5}"
PYTHONPATH="$tools/..${PYTHONPATH:+:$PYTHONPATH}" \
srun --partition="$partition" \
    --job-name="$job_name" \
    --gres="gpu:$gpus_per_node" \
    --ntasks="$gpus" \
    --ntasks-per-node="$gpus_per_node" \
    --cpus-per-task="${CPUS_PER_TASK:-5}" \
    --kill-on-bad-exit=1 \
    ${srun_args[@]+"${srun_args[@]}"} \
    python -u "$tools/test.py" "$config" "$checkpoint" --launcher slurm "$@"
