# Demo: the real UperNet VMamba-T ADE20K config on the synthetic ADE20K of
# `python -m mmvmamba.datasets.synthetic` (no download), with a small VMamba
# trained from scratch, 128-pixel crops and a short schedule, so that it
# trains and evaluates on a laptop CPU (see tools/demo.sh).
_base_ = '../upernet_vmamba_t_512x512_160k_ade20k.py'
custom_imports = dict(imports=['mmvmamba'], allow_failed_imports=False)

data_root = 'data/synthetic/ADEChallengeData2016'
# The 7 ADE20K classes the synthetic scenes hold
# (mmvmamba.datasets.synthetic.SYNTHETIC_ADE_CLASSES, in ADE20K's order): the
# dataset maps their labels to 0..6 (mmseg's label_map) and the evaluation
# table lists these 7, not 150 of which 143 would be nan.
metainfo = dict(
    classes=('building', 'sky', 'tree', 'road', 'grass', 'mountain', 'water'))
num_classes = 7
crop_size = (128, 128)
test_scale = (512, 128)  # (2048, 512) / 4
max_iters = 400

# ---- model: a small VMamba and narrower heads ----
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        arch=dict(_delete_=True, embed_dims=32, depths=[1, 1, 2, 1]),
        drop_path_rate=0.,
        init_cfg=None),
    decode_head=dict(
        in_channels=[32, 64, 128, 256], channels=64,
        num_classes=num_classes),
    auxiliary_head=dict(
        in_channels=128, channels=32, num_classes=num_classes))

# ---- data: the synthetic set at a quarter of ADE20K's scale ----
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(
        type='RandomResize',
        scale=test_scale,
        ratio_range=(0.5, 2.0),
        keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=test_scale, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='TestTimeAug',
        transforms=[
            [
                dict(
                    type='Resize',
                    scale=(int(test_scale[0] * r), int(test_scale[1] * r)),
                    keep_ratio=True) for r in [0.5, 0.75, 1.0, 1.25, 1.5]
            ],
            [
                dict(type='RandomFlip', prob=0., direction='horizontal'),
                dict(type='RandomFlip', prob=1., direction='horizontal')
            ],
            [dict(type='LoadAnnotations')],
            [dict(type='PackSegInputs')],
        ])
]
train_dataloader = dict(
    batch_size=4,
    num_workers=1,
    dataset=dict(
        data_root=data_root, metainfo=metainfo, pipeline=train_pipeline))
val_dataloader = dict(
    num_workers=1,
    dataset=dict(
        data_root=data_root, metainfo=metainfo, pipeline=test_pipeline))
test_dataloader = val_dataloader

# ---- schedule: a few hundred iterations from scratch, larger lr ----
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(optimizer=dict(lr=2e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(
        type='PolyLR',
        eta_min=0.,
        power=1.0,
        begin=50,
        end=max_iters,
        by_epoch=False)
]
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(interval=max_iters, max_keep_ckpts=1))

# a fixed seed, so that runs repeat their figures (nearly: CPU threads may
# sum in another order)
randomness = dict(seed=0)
