#!/usr/bin/env bash
# Train on several GPUs of one or more hosts with torch.distributed.run.
#
#   bash tools/dist_train.sh CONFIG GPUS [tools/train.py options]
#
# Several hosts: set NNODES, NODE_RANK, MASTER_ADDR and PORT on each.
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: $0 CONFIG GPUS [train.py options]" >&2
    exit 2
fi
config=$1
gpus=$2
shift 2
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
    "$tools/train.py" "$config" --launcher pytorch "$@"
