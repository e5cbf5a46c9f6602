# Mask R-CNN 1x with VMamba2: the schedule of mask_rcnn_adamw_1x.py and the
# authors' weight-decay set (vmamba2_paramwise.py).
_base_ = ['./mask_rcnn_adamw_1x.py', './vmamba2_paramwise.py']

optim_wrapper = dict(
    paramwise_cfg=dict(
        _delete_=True, custom_keys=_base_.vmamba2_paramwise_cfg.custom_keys))
