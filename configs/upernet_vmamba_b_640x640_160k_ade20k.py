# UperNet, VMamba-B, ADE20K 640x640 crops (test scale (2560, 640)), 160k
# iterations. Backbone weights: checkpoints/vmamba_b_in1k.pth (see README).
_base_ = './upernet_vmamba_s_640x640_160k_ade20k.py'
custom_imports = dict(imports=['mmvmamba'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        arch='base',
        init_cfg=dict(checkpoint='checkpoints/vmamba_b_in1k.pth')),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
