# Mask R-CNN + FPN, VMamba-B, COCO, 1x schedule (paper: box AP 48.5, mask AP
# 43.1). Backbone weights: checkpoints/vmamba_b_in1k.pth (see README).
_base_ = './mask_rcnn_vmamba_t_1x_coco.py'
custom_imports = dict(imports=['mmvmamba'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        arch='base',
        init_cfg=dict(checkpoint='checkpoints/vmamba_b_in1k.pth')),
    neck=dict(in_channels=[128, 256, 512, 1024]))
