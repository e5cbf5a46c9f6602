# UperNet, VMamba-S, ADE20K 512x512, 160k iterations (paper: mIoU 49.5).
# Backbone weights: checkpoints/vmamba_s_in1k.pth (see README).
_base_ = './upernet_vmamba_t_512x512_160k_ade20k.py'
custom_imports = dict(imports=['mmvmamba'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        arch='small',
        init_cfg=dict(checkpoint='checkpoints/vmamba_s_in1k.pth')))
