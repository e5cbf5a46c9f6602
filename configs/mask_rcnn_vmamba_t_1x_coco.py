# Mask R-CNN + FPN, VMamba-T, COCO, 1x schedule (paper: box AP 46.5, mask AP
# 42.1). Backbone weights: checkpoints/vmamba_t_in1k.pth (see README); train
# from scratch with --cfg-options model.backbone.init_cfg=None.
_base_ = [
    '_base_/models/mask_rcnn_vmamba_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    '_base_/schedules/mask_rcnn_adamw_1x.py',
    'mmdet::_base_/default_runtime.py'
]
custom_imports = dict(imports=['mmvmamba'], allow_failed_imports=False)
