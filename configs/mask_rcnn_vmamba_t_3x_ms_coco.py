# Mask R-CNN + FPN, VMamba-T, COCO, 3x schedule with multi-scale training
# (paper: box AP 48.5, mask AP 43.2). Backbone weights:
# checkpoints/vmamba_t_in1k.pth (see README).
_base_ = [
    '_base_/models/mask_rcnn_vmamba_fpn.py',
    '_base_/datasets/coco_instance_ms_crop.py',
    '_base_/schedules/mask_rcnn_adamw_3x.py',
    'mmdet::_base_/default_runtime.py'
]
custom_imports = dict(imports=['mmvmamba'], allow_failed_imports=False)
