# UperNet, VMamba2-B (the authors' VMamba-B[s2l15]), ADE20K 512x512, 160k
# iterations (authors: mIoU 51.0, multi-scale + flip 51.6). Backbone
# weights: checkpoints/vmamba2_b_in1k.pth (see README).
_base_ = './upernet_vmamba2_t_512x512_160k_ade20k.py'
custom_imports = dict(imports=['mmvmamba'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.6,
        init_cfg=dict(checkpoint='checkpoints/vmamba2_b_in1k.pth')),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
