# Mask R-CNN + FPN, VMamba2-T (the authors' VMamba-T[s1l8]), COCO, 3x
# schedule with multi-scale training (authors: box AP 48.8, mask AP 43.7).
# Backbone weights: checkpoints/vmamba2_t_in1k.pth (see README).
_base_ = [
    '_base_/models/mask_rcnn_vmamba2_fpn.py',
    '_base_/datasets/coco_instance_ms_crop.py',
    '_base_/schedules/mask_rcnn_vmamba2_adamw_3x.py',
    'mmdet::_base_/default_runtime.py'
]
custom_imports = dict(imports=['mmvmamba'], allow_failed_imports=False)
