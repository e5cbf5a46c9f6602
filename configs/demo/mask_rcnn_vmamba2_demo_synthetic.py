# Demo: the real Mask R-CNN VMamba2-T 1x config on the synthetic COCO of
# `python -m mmvmamba.datasets.synthetic` (no download), with a small VMamba2
# trained from scratch, 128-pixel images and a short schedule, so that it
# trains and evaluates on a laptop CPU (see tools/demo.sh det2).
_base_ = '../mask_rcnn_vmamba2_t_1x_coco.py'
custom_imports = dict(imports=['mmvmamba'], allow_failed_imports=False)

data_root = 'data/synthetic/coco/'
# mmvmamba.datasets.synthetic.SYNTHETIC_COCO_CLASSES, in category id order
metainfo = dict(classes=('stop sign', 'sports ball', 'kite', 'pizza', 'tv'))
num_classes = 5
img_scale = (128, 128)
width = 64  # channels of the FPN and the heads (256 in the real model)

# ---- model: a small VMamba2, narrower heads, fewer proposals ----
model = dict(
    backbone=dict(
        arch=dict(
            _delete_=True,
            embed_dims=32,
            depths=[1, 1, 2, 1],
            ssm_ratio=1.0,
            d_state=1,
            mlp_ratio=4.0),
        drop_path_rate=0.,
        init_cfg=None),
    neck=dict(in_channels=[32, 64, 128, 256], out_channels=width),
    rpn_head=dict(in_channels=width, feat_channels=width),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=width),
        bbox_head=dict(
            in_channels=width, fc_out_channels=256,
            num_classes=num_classes),
        mask_roi_extractor=dict(out_channels=width),
        mask_head=dict(
            in_channels=width, conv_out_channels=width,
            num_classes=num_classes)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=1000, max_per_img=300),
        rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(
        rpn=dict(nms_pre=500, max_per_img=100),
        rcnn=dict(max_per_img=20)))

# ---- data: the synthetic set at its own size ----
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor'))
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
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator

# ---- schedule: a few epochs from scratch, so a larger learning rate ----
max_epochs = 3
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[2],
        gamma=0.1)
]
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(interval=1, max_keep_ckpts=1))

# a fixed seed, so that runs repeat their figures (nearly: CPU threads may
# sum in another order)
randomness = dict(seed=0)
