# Mask R-CNN 1x (12 epochs) as in the paper (Swin's recipe): AdamW lr 1e-4,
# weight decay 0.05, batch 16 (2 x 8 GPUs); linear warm-up 1000 iterations
# from 0.001, lr x0.1 at epochs 8 and 11.
_base_ = ['mmdet::_base_/schedules/schedule_1x.py', './vmamba_paramwise.py']

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(
        type='LinearLR', start_factor=0.001, by_epoch=False, begin=0,
        end=1000),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[8, 11],
        gamma=0.1)
]
optim_wrapper = dict(
    type='OptimWrapper',
    constructor='MergedGroupsOptimWrapperConstructor',
    optimizer=dict(
        _delete_=True,
        type='AdamW',
        lr=0.0001,
        betas=(0.9, 0.999),
        weight_decay=0.05),
    paramwise_cfg=_base_.paramwise_cfg)

# Checkpoints keep the random generators' states and --resume restores them,
# so that a resumed run continues as if it had not stopped (mmvmamba's
# RandomStateHook).
custom_hooks = [dict(type='RandomStateHook')]
