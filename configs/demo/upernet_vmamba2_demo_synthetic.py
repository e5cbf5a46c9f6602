# Demo: the real UperNet VMamba2-T ADE20K config (../upernet_vmamba2_t_512x512_160k_ade20k.py) on the
# synthetic ADE20K of `python -m mmvmamba.datasets.synthetic` (no download),
# with a small VMamba2 trained from scratch (see tools/demo.sh seg2). It is
# the VMamba demo (upernet_vmamba_demo_synthetic.py: data, heads, schedule)
# with the backbone swapped and the VMamba2 weight-decay set
# (../_base_/schedules/upernet_vmamba2_adamw_160k.py).
_base_ = [
    './upernet_vmamba_demo_synthetic.py',
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
