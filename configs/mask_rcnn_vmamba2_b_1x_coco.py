# Mask R-CNN + FPN, VMamba2-B (the authors' VMamba-B[s2l15]), COCO, 1x
# schedule (authors: box AP 49.2, mask AP 44.1). Backbone weights:
# checkpoints/vmamba2_b_in1k.pth (see README).
_base_ = './mask_rcnn_vmamba2_t_1x_coco.py'
custom_imports = dict(imports=['mmvmamba'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.6,
        init_cfg=dict(checkpoint='checkpoints/vmamba2_b_in1k.pth')),
    neck=dict(in_channels=[128, 256, 512, 1024]))
