# Mask R-CNN + FPN with a VMamba2-T backbone (the authors' VMamba-T[s1l8],
# ImageNet-1k weights). mmdet's stock model with the backbone swapped, as in
# the authors' detection/configs/vssm1/mask_rcnn_vssm_fpn_coco_tiny.py; S and
# B configs change ``backbone.arch``, drop_path_rate, the checkpoint and
# ``neck.in_channels``.
_base_ = 'mmdet::_base_/models/mask-rcnn_r50_fpn.py'
custom_imports = dict(imports=['mmvmamba'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='VMamba2',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        frozen_stages=-1,
        norm_eval=False,
        with_cp=False,
        # made by tools/model_converters/vmamba2mmvmamba.py (see README)
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/vmamba2_t_in1k.pth',
            prefix='backbone.')),
    neck=dict(in_channels=[96, 192, 384, 768]))
