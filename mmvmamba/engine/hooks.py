"""Hooks of mmvmamba, registered in mmengine's root ``HOOKS`` registry (so
mmdet, mmseg and mmpretrain configs find them under their own scopes)."""
import zlib
from typing import Optional, Sequence

import torch
from mmengine import dist
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class MeanLossAcrossRanksHook(Hook):
    """Log the mean of the training losses over all processes, not rank 0's.

    mmengine's ``BaseModel.parse_losses`` does not reduce across processes,
    so in a distributed run the ``loss`` and ``loss_*`` (and ``acc``...)
    that rank 0 logs are those of its own share of the batch. After each
    training iteration this hook replaces every tensor of the step's outputs
    (the ``log_vars`` of ``train_step``) by its mean over the default
    process group; the logs then show the loss of the whole batch, which a
    run on fewer processes with a larger batch per process can be compared
    with (``tools/analysis/compare_losses.py``). Precisely, it is the mean
    of the processes' own means, the loss their averaged gradients follow;
    it equals the whole batch's mean where every process averages over as
    many elements (a loss per image or pixel; not mmdet's mask loss, a mean
    over each process's positive proposals).

    - Priority ``'HIGHEST'``: it runs before mmengine's ``RuntimeInfoHook``
      (``'VERY_HIGH'``) puts the outputs into the message hub, from which
      the logger reads them.
    - Only what is logged changes: the loss was already backpropagated, and
      the reduced values are new, detached tensors (floating ones keep their
      dtype, others become float32).
    - One process, or ``torch.distributed`` not initialised: does nothing.
    - Costs two small all-reduces per iteration: one checks that every
      process logs the same keys and shapes (else a ``RuntimeError`` naming
      this rank's keys, raised on every rank alike, instead of a hang), one
      averages the values, in float64.

    Enable it in a config::

        custom_hooks = [dict(type='MeanLossAcrossRanksHook')]

    or from the command line (``--cfg-options`` cannot write a list of
    dicts, but ``default_hooks`` takes extra named hooks)::

        --cfg-options default_hooks.mean_loss.type=MeanLossAcrossRanksHook
    """

    priority = 'HIGHEST'

    def after_train_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch=None,
                         outputs: Optional[dict] = None) -> None:
        if outputs is not None:
            mean_across_ranks(outputs)


def _signature(keys: Sequence[str], numels: Sequence[int]) -> int:
    text = '\0'.join(f'{key}:{numel}' for key, numel in zip(keys, numels))
    return zlib.crc32(text.encode())


def mean_across_ranks(outputs: dict) -> dict:
    """Replace each tensor of ``outputs`` by its mean over all processes.

    Works in place on the dict (and returns it); a no-op in a single
    process. Every process must call it with the same keys and shapes.
    """
    if not dist.is_distributed() or dist.get_world_size() < 2:
        return outputs
    keys = sorted(k for k, v in outputs.items() if isinstance(v, torch.Tensor))
    numels = [outputs[k].numel() for k in keys]
    sign = _signature(keys, numels)
    # max of (x, -x) gives the largest and the smallest over the ranks
    agree = torch.tensor([len(keys), sign, -len(keys), -sign],
                         dtype=torch.int64)
    dist.all_reduce(agree, op='max')
    most_keys, most_sign, fewest_keys, least_sign = agree.tolist()
    if most_keys != -fewest_keys or most_sign != -least_sign:
        raise RuntimeError(
            'MeanLossAcrossRanksHook: the processes log different outputs '
            f'(rank {dist.get_rank()}: '
            f'{dict(zip(keys, numels))}, as key: number of elements)')
    if not keys:
        return outputs
    flat = torch.cat([
        outputs[k].detach().reshape(-1).to(torch.float64) for k in keys
    ])
    dist.all_reduce(flat, op='mean')
    for key, chunk in zip(keys, flat.split(numels)):
        value = outputs[key]
        dtype = value.dtype if value.is_floating_point() else torch.float32
        outputs[key] = chunk.reshape(value.shape).to(
            device=value.device, dtype=dtype)
    return outputs
