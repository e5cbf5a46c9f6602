# No weight decay on the backbone's norms and SSM parameters, shared by the
# detection and segmentation schedules (as ``_base_.paramwise_cfg``).
# - norms: every LayerNorm/BN/GN (norm_decay_mult) and, as in Swin's mmdet
#   and mmseg configs, every parameter whose name holds 'norm';
# - A_logs and Ds: the state matrix (log) and skip of the scan, which the
#   authors' model marks ``_no_weight_decay`` (as Mamba does);
#   dt_projs_bias decays like the other biases.
paramwise_cfg = dict(
    norm_decay_mult=0.,
    custom_keys={
        'norm': dict(decay_mult=0.),
        'A_logs': dict(decay_mult=0.),
        'Ds': dict(decay_mult=0.),
    })
