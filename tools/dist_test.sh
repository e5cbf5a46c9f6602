#!/usr/bin/env bash
# Test a checkpoint on several GPUs with torch.distributed.run.
#
#   bash tools/dist_test.sh CONFIG CHECKPOINT GPUS [tools/test.py options]
#
# Several hosts: set NNODES, NODE_RANK, MASTER_ADDR and PORT on each.
set -euo pipefail
if [[ $# -lt 3 ]]; then
    echo "usage: $0 CONFIG CHECKPOINT GPUS [test.py options]" >&2
    exit 2
fi
config=$1
checkpoint=$2
gpus=$3
shift 3
tools="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$tools/launch_checks.sh"
require_count GPUS "$gpus"
PYTHONPATH="$tools/..${PYTHONPATH:+:$PYTHONPATH}" \
python -m torch.distributed.run \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="${PORT:-29500}" \
    --nproc_per_node="$gpus" \
    "$tools/test.py" "$config" "$checkpoint" --launcher pytorch "$@"
