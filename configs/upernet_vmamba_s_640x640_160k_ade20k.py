# UperNet, VMamba-S, ADE20K 640x640 crops (test scale (2560, 640)), 160k
# iterations. Backbone weights: checkpoints/vmamba_s_in1k.pth (see README).
_base_ = [
    '_base_/models/upernet_vmamba.py', '_base_/datasets/ade20k_640x640.py',
    'mmseg::_base_/default_runtime.py',
    '_base_/schedules/upernet_adamw_160k.py'
]
custom_imports = dict(imports=['mmvmamba'], allow_failed_imports=False)

crop_size = (640, 640)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        arch='small',
        init_cfg=dict(checkpoint='checkpoints/vmamba_s_in1k.pth')))
