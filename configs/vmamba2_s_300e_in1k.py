# VMamba2-S (the authors' VMamba-S[s2l15]) on ImageNet-1k: VMamba2-T's
# recipe, ssm_ratio 2, deeper third stage, drop-path 0.3. Authors: top-1
# 83.6.
_base_ = './vmamba2_t_300e_in1k.py'

model = dict(backbone=dict(arch='small', drop_path_rate=0.3))
