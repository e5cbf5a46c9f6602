"""An optimizer wrapper constructor that keeps one param group per setting,
registered in mmengine's root ``OPTIM_WRAPPER_CONSTRUCTORS`` (so mmdet,
mmseg and mmpretrain configs find it under their own scopes)."""
from typing import List, Optional, Union

import torch.nn as nn
from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapper
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS
from torch.optim import Optimizer


def _options(group: dict) -> dict:
    """A param group's options: every key but ``'params'``."""
    return {k: v for k, v in group.items() if k != 'params'}


def merge_param_groups(groups: List[dict]) -> List[dict]:
    """Param groups with the same options joined into one.

    Two groups are joined when their options (every key but ``'params'``)
    are equal, key for key: a group that names the optimizer's default
    ``lr`` and one that leaves it out stay apart. The joined groups keep the
    order of their first members, and each its parameters in their order.

    Args:
        groups (list[dict]): Param groups, each with a ``'params'`` list.

    Returns:
        list[dict]: New groups; the inputs are not modified.
    """
    merged: List[dict] = []
    for group in groups:
        if not isinstance(group, dict) or 'params' not in group:
            raise TypeError('groups must be dicts with a "params" list, '
                            f'got {group!r}')
        options = _options(group)
        for target in merged:
            if _options(target) == options:
                target['params'].extend(group['params'])
                break
        else:
            merged.append(dict(options, params=list(group['params'])))
    return merged


def check_state_groups(optimizer: Optimizer, state_dict: dict) -> None:
    """Refuse, saying how to resume it, an optimizer state whose param
    groups are not ``optimizer``'s (a ``load_state_dict`` pre-hook).

    A run saved with mmengine's default constructor (one group per
    parameter) resumes with it: ``--cfg-options
    optim_wrapper.constructor=DefaultOptimWrapperConstructor``.

    Raises:
        ValueError: The state has another number of groups.
    """
    saved = len(state_dict.get('param_groups', []))
    groups = len(optimizer.param_groups)
    if saved != groups:
        raise ValueError(
            f'the optimizer state to load has {saved} param groups, this '
            f'optimizer {groups} (MergedGroupsOptimWrapperConstructor: one '
            'per setting); a run saved with one group per parameter resumes '
            'with --cfg-options '
            'optim_wrapper.constructor=DefaultOptimWrapperConstructor')


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class MergedGroupsOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """mmengine's default constructor with one param group per setting.

    With a ``paramwise_cfg``, mmengine's ``DefaultOptimWrapperConstructor``
    gives every parameter its own param group, and PyTorch's optimizers
    then step each group alone: AdamW's multi-tensor kernels run once per
    parameter (about 10 launches each; a Mask R-CNN VMamba-T has 258
    parameters). This constructor applies the same ``paramwise_cfg`` rules,
    then joins the groups whose options are equal
    (:func:`merge_param_groups`), so the optimizer steps all parameters of
    a setting together. Every parameter gets the same learning rate and
    weight decay as with the default constructor, and the updates are the
    same; parameter schedulers scale every group alike.

    A checkpoint's optimizer state holds its groups: a run saved with one
    group per parameter (mmengine's default constructor, these configs
    before) resumes with that one (:func:`check_state_groups` says so).

    Use it in a config as
    ``optim_wrapper = dict(constructor='MergedGroupsOptimWrapperConstructor',
    ...)``; its arguments are those of ``DefaultOptimWrapperConstructor``.
    """

    def add_params(self,
                   params: List[dict],
                   module: nn.Module,
                   prefix: str = '',
                   is_dcn_module: Optional[Union[int, float]] = None) -> None:
        """Add the parameters of ``module`` to ``params`` as the default
        constructor does; at the top level (``prefix`` empty), join the
        groups it made with equal options."""
        if prefix:
            super().add_params(params, module, prefix, is_dcn_module)
            return
        own: List[dict] = []
        super().add_params(own, module, prefix, is_dcn_module)
        self._merged = True
        params.extend(merge_param_groups(own))

    def __call__(self, model: nn.Module) -> OptimWrapper:
        self._merged = False
        optim_wrapper = super().__call__(model)
        if self._merged:
            optim_wrapper.optimizer.register_load_state_dict_pre_hook(
                check_state_groups)
        return optim_wrapper
