# UperNet, VMamba2-T (the authors' VMamba-T[s1l8]), ADE20K 512x512, 160k
# iterations (authors: mIoU 47.9, multi-scale + flip 48.8 with tools/test.py
# --tta). Backbone weights: checkpoints/vmamba2_t_in1k.pth (see README).
_base_ = [
    '_base_/models/upernet_vmamba2.py', '_base_/datasets/ade20k_512x512.py',
    'mmseg::_base_/default_runtime.py',
    '_base_/schedules/upernet_vmamba2_adamw_160k.py'
]
custom_imports = dict(imports=['mmvmamba'], allow_failed_imports=False)
