# Mask R-CNN + FPN, VMamba-S, COCO, 3x schedule with multi-scale training
# (paper: box AP 49.7, mask AP 44.0). Backbone weights:
# checkpoints/vmamba_s_in1k.pth (see README).
_base_ = './mask_rcnn_vmamba_t_3x_ms_coco.py'
custom_imports = dict(imports=['mmvmamba'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        arch='small',
        init_cfg=dict(checkpoint='checkpoints/vmamba_s_in1k.pth')))
