# VMamba-S on ImageNet-1k (paper: top-1 83.5): VMamba-T's recipe, deeper
# third stage and drop-path 0.3.
_base_ = './vmamba_t_300e_in1k.py'

model = dict(backbone=dict(arch='small', drop_path_rate=0.3))
