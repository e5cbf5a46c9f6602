# Mask R-CNN + FPN, VMamba-S, COCO, 1x schedule (paper: box AP 48.2, mask AP
# 43.0). Backbone weights: checkpoints/vmamba_s_in1k.pth (see README).
_base_ = './mask_rcnn_vmamba_t_1x_coco.py'
custom_imports = dict(imports=['mmvmamba'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        arch='small',
        init_cfg=dict(checkpoint='checkpoints/vmamba_s_in1k.pth')))
