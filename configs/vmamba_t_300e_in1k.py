# VMamba-T on ImageNet-1k, the paper's recipe (Swin's): AdamW lr 1e-3 at
# batch 1024 (16 GPUs x 64), weight decay 0.05, 300 epochs with 20 of linear
# warm-up then cosine, label smoothing 0.1, Mixup 0.8 / CutMix 1.0,
# RandAugment, random erasing, EMA, drop-path 0.2. Paper: top-1 82.2.
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
    'mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py',
    'mmpretrain::_base_/default_runtime.py'
]
custom_imports = dict(imports=['mmvmamba'], allow_failed_imports=False)

model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='VMamba', arch='tiny', out_indices=(3, ), drop_path_rate=0.2),
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

# No decay on norms, biases and 1-D parameters (Swin's rule), nor on the
# scan's A_logs, which the authors mark _no_weight_decay.
optim_wrapper = dict(
    constructor='MergedGroupsOptimWrapperConstructor',
    paramwise_cfg=dict(
        _delete_=True,
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        flat_decay_mult=0.0,
        custom_keys={'A_logs': dict(decay_mult=0.0)}),
    clip_grad=dict(max_norm=5.0))

# EMA of the weights (the authors' model_ema, decay 0.9999); the random
# generators' states kept in checkpoints and restored by --resume.
custom_hooks = [
    dict(type='EMAHook', momentum=1e-4, priority='ABOVE_NORMAL'),
    dict(type='RandomStateHook')
]
