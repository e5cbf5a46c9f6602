# UperNet 160k with VMamba2: the schedule of upernet_adamw_160k.py and the
# authors' weight-decay set (vmamba2_paramwise.py).
_base_ = ['./upernet_adamw_160k.py', './vmamba2_paramwise.py']

optim_wrapper = dict(
    paramwise_cfg=dict(
        _delete_=True, custom_keys=_base_.vmamba2_paramwise_cfg.custom_keys))
