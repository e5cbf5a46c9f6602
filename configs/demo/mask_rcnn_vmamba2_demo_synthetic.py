# Demo: the real Mask R-CNN VMamba2-T 1x config (../mask_rcnn_vmamba2_t_1x_coco.py) on the
# synthetic COCO of `python -m mmvmamba.datasets.synthetic` (no download),
# with a small VMamba2 trained from scratch (see tools/demo.sh det2). It is
# the VMamba demo (mask_rcnn_vmamba_demo_synthetic.py: data, heads, schedule)
# with the backbone swapped and the VMamba2 weight-decay set
# (../_base_/schedules/mask_rcnn_vmamba2_adamw_1x.py).
_base_ = [
    './mask_rcnn_vmamba_demo_synthetic.py',
    '../_base_/schedules/vmamba2_paramwise.py'
]

model = dict(
    backbone=dict(
        _delete_=True,
        type='VMamba2',
        arch=dict(
            embed_dims=32,
            depths=[1, 1, 2, 1],
            ssm_ratio=1.0,
            d_state=1,
            mlp_ratio=4.0),
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.,
        frozen_stages=-1,
        norm_eval=False,
        with_cp=False,
        init_cfg=None))
optim_wrapper = dict(
    paramwise_cfg=dict(
        _delete_=True, custom_keys=_base_.vmamba2_paramwise_cfg.custom_keys))
