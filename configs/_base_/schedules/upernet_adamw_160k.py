# UperNet 160k iterations as in the paper (Swin's recipe): AdamW lr 6e-5,
# weight decay 0.01, batch 16 (2 x 8 GPUs); linear warm-up 1500 iterations
# from 1e-6, then poly decay (power 1) to 0.
_base_ = [
    'mmseg::_base_/schedules/schedule_160k.py', './vmamba_paramwise.py'
]

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='MergedGroupsOptimWrapperConstructor',
    optimizer=dict(
        type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=_base_.paramwise_cfg)
param_scheduler = [
    dict(
        type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0,
        end=1500),
    dict(
        type='PolyLR',
        eta_min=0.0,
        power=1.0,
        begin=1500,
        end=160000,
        by_epoch=False)
]

# Checkpoints keep the random generators' states and --resume restores them,
# so that a resumed run continues as if it had not stopped (mmvmamba's
# RandomStateHook).
custom_hooks = [dict(type='RandomStateHook')]
