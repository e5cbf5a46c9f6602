#!/usr/bin/env bash
# The embedded demo: Mask R-CNN and UperNet with a small VMamba, trained and
# evaluated on the CPU on synthetic COCO / ADE20K data; nothing is downloaded
# (apart from the environment's packages on the first run).
#
#   bash tools/demo.sh              # detection, then segmentation
#   bash tools/demo.sh det          # only one of them: det or seg
#   bash tools/demo.sh det2 seg2    # the same with VMamba2 (the authors'
#                                   # current models)
#
# Steps: (1) tools/setup_env.sh builds or reuses the virtualenv, (2) the
# synthetic data sets are written to data/synthetic (seed 0), (3) each demo
# config is trained with tools/train.py and its last checkpoint evaluated
# with tools/test.py (COCO box/mask mAP; mIoU beside the mIoU of a constant
# prediction). Logs and checkpoints go to work_dirs/demo/.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
if [[ $# -gt 0 ]]; then tasks=("$@"); else tasks=(det seg); fi

echo "== [1/3] environment"
bash tools/setup_env.sh
# shellcheck disable=SC1090
source "$(bash tools/setup_env.sh --print-activate)"
echo "using $(command -v python)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# stop when a C++ compiler is there but mmvmamba._C does not load (the demo
# would run on the slow PyTorch reference; MMVMAMBA_ALLOW_NO_EXT=1 lets it)
python -c 'import sys; from mmvmamba.ops._ext import check_extension; sys.exit(check_extension("demo"))'
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::UserWarning}"

echo "== [2/3] synthetic data -> data/synthetic"
python -m mmvmamba.datasets.synthetic --out data/synthetic --seed 0

summary=()
for task in "${tasks[@]}"; do
    case "$task" in
        det) config=configs/demo/mask_rcnn_vmamba_demo_synthetic.py ;;
        seg) config=configs/demo/upernet_vmamba_demo_synthetic.py ;;
        det2) config=configs/demo/mask_rcnn_vmamba2_demo_synthetic.py ;;
        seg2) config=configs/demo/upernet_vmamba2_demo_synthetic.py ;;
        *) echo "unknown demo '$task' (det, seg, det2 or seg2)" >&2; exit 2 ;;
    esac
    work="work_dirs/demo/$task"
    rm -rf "$work" "$work-test"
    echo "== [3/3] $task: train $config"
    start=$SECONDS
    # no validation while training: tools/test.py evaluates below
    python tools/train.py "$config" --work-dir "$work" \
        --cfg-options val_dataloader=None val_cfg=None val_evaluator=None
    trained=$((SECONDS - start))
    checkpoint="$(cat "$work/last_checkpoint")"
    echo "== [3/3] $task: test $checkpoint"
    start=$SECONDS
    python tools/test.py "$config" "$checkpoint" --work-dir "$work-test"
    tested=$((SECONDS - start))
    result="$(python - "$work-test" "$task" <<'EOF'
import glob
import json
import os.path as osp
import sys

from mmvmamba.datasets.synthetic import constant_prediction_miou

work, task = sys.argv[1:]
with open(sorted(glob.glob(osp.join(work, '*', '*.json')))[-1]) as f:
    metrics = json.load(f)
if task.startswith('det'):
    print(f"bbox mAP {metrics['coco/bbox_mAP']:.3f}, "
          f"segm mAP {metrics['coco/segm_mAP']:.3f}")
else:
    baseline = constant_prediction_miou('data/synthetic/ADEChallengeData2016')
    print(f"mIoU {metrics['mIoU']:.1f} "
          f"(constant prediction: {baseline:.1f})")
EOF
)"
    summary+=("$task: $result; train ${trained}s, test ${tested}s")
done

echo "== demo results (validation split of data/synthetic)"
printf '%s\n' "${summary[@]}"
