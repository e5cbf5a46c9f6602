# Mask R-CNN + FPN, VMamba2-S (the authors' VMamba-S[s2l15]), COCO, 1x
# schedule (authors: box AP 48.7, mask AP 43.7). Backbone weights:
# checkpoints/vmamba2_s_in1k.pth (see README).
_base_ = './mask_rcnn_vmamba2_t_1x_coco.py'
custom_imports = dict(imports=['mmvmamba'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.3,
        init_cfg=dict(checkpoint='checkpoints/vmamba2_s_in1k.pth')))
