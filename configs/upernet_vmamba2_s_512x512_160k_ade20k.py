# UperNet, VMamba2-S (the authors' VMamba-S[s2l15]), ADE20K 512x512, 160k
# iterations (authors: mIoU 50.6, multi-scale + flip 51.2). Backbone
# weights: checkpoints/vmamba2_s_in1k.pth (see README).
_base_ = './upernet_vmamba2_t_512x512_160k_ade20k.py'
custom_imports = dict(imports=['mmvmamba'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.3,
        init_cfg=dict(checkpoint='checkpoints/vmamba2_s_in1k.pth')))
