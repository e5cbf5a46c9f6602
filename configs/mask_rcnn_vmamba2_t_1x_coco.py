# Mask R-CNN + FPN, VMamba2-T (the authors' VMamba-T[s1l8]), COCO, 1x
# schedule (authors: box AP 47.3, mask AP 42.7). Backbone weights:
# checkpoints/vmamba2_t_in1k.pth (see README); train from scratch with
# --cfg-options model.backbone.init_cfg=None. The authors' own detector
# checkpoints convert with tools/model_converters/vmamba2mmvmamba.py and test
# with this config.
_base_ = [
    '_base_/models/mask_rcnn_vmamba2_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    '_base_/schedules/mask_rcnn_vmamba2_adamw_1x.py',
    'mmdet::_base_/default_runtime.py'
]
custom_imports = dict(imports=['mmvmamba'], allow_failed_imports=False)
