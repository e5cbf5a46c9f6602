# VMamba2-T (the authors' VMamba-T[s1l8]) on ImageNet-1k, the authors'
# recipe (their classification/config.py and main.py): AdamW lr 1e-3 at
# batch 1024 (8 GPUs x 128), weight decay 0.05 on every parameter of more
# than one dimension (A_logs and dt_projs_bias included; no decay for norms,
# biases and Ds), 300 epochs with 20 of linear warm-up from 1e-6, cosine to
# 1e-5, gradient clipping 5.0, label smoothing 0.1, Mixup 0.8 / CutMix 1.0,
# RandAugment, random erasing 0.25, EMA 0.9999, drop-path 0.2. They trained
# with mixed precision: add --amp. Authors: top-1 82.6.
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
    'mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py',
    'mmpretrain::_base_/default_runtime.py'
]
custom_imports = dict(imports=['mmvmamba'], allow_failed_imports=False)

model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='VMamba2', arch='tiny', out_indices=(3, ), drop_path_rate=0.2),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=768,
        init_cfg=dict(type='TruncNormal', layer='Linear', std=0.02, bias=0.),
        loss=dict(
            type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
        cal_acc=False),
    train_cfg=dict(augments=[
        dict(type='Mixup', alpha=0.8),
        dict(type='CutMix', alpha=1.0)
    ]))

train_dataloader = dict(batch_size=128)

# The authors' rule (utils/optimizer.py): no decay for 1-D parameters and
# biases; everything else decays.
optim_wrapper = dict(
    constructor='MergedGroupsOptimWrapperConstructor',
    paramwise_cfg=dict(
        _delete_=True,
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        flat_decay_mult=0.0),
    clip_grad=dict(max_norm=5.0))

# EMA of the weights (the authors' model_ema, decay 0.9999).
custom_hooks = [dict(type='EMAHook', momentum=1e-4, priority='ABOVE_NORMAL')]
