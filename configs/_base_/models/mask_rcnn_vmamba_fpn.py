# Mask R-CNN + FPN with a VMamba-T backbone (ImageNet-1k weights).
# mmdet's stock model with the backbone swapped; S and B configs change
# ``backbone.arch``, its checkpoint and ``neck.in_channels``.
_base_ = 'mmdet::_base_/models/mask-rcnn_r50_fpn.py'
custom_imports = dict(imports=['mmvmamba'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='VMamba',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        frozen_stages=-1,
        norm_eval=False,
        with_cp=False,
        # made by tools/model_converters/vmamba2mmvmamba.py (see README)
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/vmamba_t_in1k.pth',
            prefix='backbone.')),
    neck=dict(in_channels=[96, 192, 384, 768]))
