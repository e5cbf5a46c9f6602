# ADE20K, 640x640 crops, 2 images per GPU (16 on 8 GPUs); mmseg's
# stock pipelines, and the paper's multi-scale + flip test: the test scale
# (2560, 640) times 0.5, 0.75, 1.0, 1.25, 1.5 and 1.75, each also
# flipped (tools/test.py --tta; tta_model: SegTTAModel from mmseg's
# default_runtime).
_base_ = 'mmseg::_base_/datasets/ade20k_640x640.py'

img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='TestTimeAug',
        transforms=[
            [
                dict(
                    type='Resize',
                    scale=(int(2560 * r), int(640 * r)),
                    keep_ratio=True) for r in img_ratios
            ],
            [
                dict(type='RandomFlip', prob=0., direction='horizontal'),
                dict(type='RandomFlip', prob=1., direction='horizontal')
            ],
            [dict(type='LoadAnnotations')],
            [dict(type='PackSegInputs')],
        ])
]
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
