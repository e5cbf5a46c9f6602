# VMamba-B on ImageNet-1k (paper: top-1 83.2): VMamba-T's recipe, width 128,
# deeper third stage and drop-path 0.5.
_base_ = './vmamba_t_300e_in1k.py'

model = dict(
    backbone=dict(arch='base', drop_path_rate=0.5),
    head=dict(in_channels=1024))
