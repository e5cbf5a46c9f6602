# Weight decay of the VMamba2 detection and segmentation configs: the
# authors' set, which follows THEIR module names. Their configs (Swin's)
# exempt every parameter whose name holds 'norm' (custom_keys 'norm',
# decay_mult 0) and nothing else: the blocks' norm / norm2, SS2D's out_norm
# and the output norms outnorm{i} get no decay, while their stem and
# downsample norms, named patch_embed.2 / .7 and downsample.3, are decayed,
# as are biases, A_logs, Ds and the heads' BatchNorms. Here those stem and
# downsample norms are named patch_embed.norm1 / .norm2 and downsample.norm,
# so the longer keys below (matched first) give them decay back.
vmamba2_paramwise_cfg = dict(
    custom_keys={
        'norm': dict(decay_mult=0.),
        'patch_embed.norm': dict(decay_mult=1.),
        'downsample.norm': dict(decay_mult=1.),
    })
