# VMamba2-B (the authors' VMamba-B[s2l15]) on ImageNet-1k: VMamba2-S's
# recipe at width 128, drop-path 0.6. Authors: top-1 83.9.
_base_ = './vmamba2_t_300e_in1k.py'

model = dict(
    backbone=dict(arch='base', drop_path_rate=0.6),
    head=dict(in_channels=1024))
