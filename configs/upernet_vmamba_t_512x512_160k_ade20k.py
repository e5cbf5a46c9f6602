# UperNet, VMamba-T, ADE20K 512x512, 160k iterations (paper: mIoU 47.3,
# multi-scale + flip 48.3 with tools/test.py --tta). Backbone weights:
# checkpoints/vmamba_t_in1k.pth (see README).
_base_ = [
    '_base_/models/upernet_vmamba.py', '_base_/datasets/ade20k_512x512.py',
    'mmseg::_base_/default_runtime.py',
    '_base_/schedules/upernet_adamw_160k.py'
]
custom_imports = dict(imports=['mmvmamba'], allow_failed_imports=False)
