# UperNet, VMamba-B, ADE20K 512x512, 160k iterations (paper: mIoU 50.0).
# Backbone weights: checkpoints/vmamba_b_in1k.pth (see README).
_base_ = './upernet_vmamba_t_512x512_160k_ade20k.py'
custom_imports = dict(imports=['mmvmamba'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        arch='base',
        init_cfg=dict(checkpoint='checkpoints/vmamba_b_in1k.pth')),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
