# Mask R-CNN + FPN, VMamba2-S (the authors' VMamba-S[s2l15]), COCO, 3x
# schedule with multi-scale training (authors: box AP 49.9, mask AP 44.2).
# Backbone weights: checkpoints/vmamba2_s_in1k.pth (see README).
_base_ = './mask_rcnn_vmamba2_t_3x_ms_coco.py'
custom_imports = dict(imports=['mmvmamba'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.3,
        init_cfg=dict(checkpoint='checkpoints/vmamba2_s_in1k.pth')))
