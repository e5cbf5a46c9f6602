"""Hooks of mmvmamba, registered in mmengine's root ``HOOKS`` registry (so
mmdet, mmseg and mmpretrain configs find them under their own scopes)."""
import random
import zlib
from typing import Optional, Sequence

import numpy as np
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


@HOOKS.register_module()
class RandomStateHook(Hook):
    """Save the random generators in checkpoints; restore them on resume.

    mmengine's checkpoints keep the model, optimizer, loss scaler,
    schedulers and message hub, but not the state of the random generators,
    so a resumed run draws other random numbers than the run it continues
    (dropout, the detectors' proposal samplers, the data pipeline when it
    runs in the main process) and its losses drift from the uninterrupted
    run's. This hook stores, in ``checkpoint['meta']['random_states']``, one
    entry per process: the states of torch's CPU generator and of every
    visible CUDA device's, numpy's global generator and Python's ``random``.

    - Saving (``before_save_checkpoint``): every process gathers all the
      processes' states (the checkpoint is written by rank 0). Only plain
      types and tensors are stored (``torch.load(weights_only=True)``
      reads them).
    - Restoring (``before_train``): after mmengine's resume has finished
      (including its re-seeding when the checkpoint's seed differs from the
      config's) and before the first iteration; only when training resumes
      (``runner.iter > 0``), not when ``load_from`` fine-tunes from a
      checkpoint. Each process takes its own rank's states. A different
      number of processes than the checkpoint's, or a checkpoint without
      states, leaves the generators as they are, with a warning.
    - Data loaded in worker processes draws from the workers' own seeds
      (mmengine derives them from the run's seed), not from these states.

    Enable it in a config (the project's schedules do)::

        custom_hooks = [dict(type='RandomStateHook')]
    """

    priority = 'LOWEST'
    KEY = 'random_states'

    def __init__(self) -> None:
        self._loaded = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        states = get_random_states()
        if dist.is_distributed() and dist.get_world_size() > 1:
            everyone = dist.all_gather_object(states)
        else:
            everyone = [states]
        checkpoint.setdefault('meta', {})[self.KEY] = everyone

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._loaded = checkpoint.get('meta', {}).get(self.KEY)

    def before_train(self, runner) -> None:
        loaded, self._loaded = self._loaded, None
        if runner.iter == 0:  # a new run, or load_from: nothing to continue
            return
        world_size = dist.get_world_size()
        if loaded is None:
            runner.logger.warning(
                'RandomStateHook: the resumed checkpoint holds no random '
                'states (saved without this hook); the random generators '
                'are not restored')
        elif len(loaded) != world_size:
            runner.logger.warning(
                f'RandomStateHook: the checkpoint holds the random states '
                f'of {len(loaded)} processes, this run has {world_size}; '
                'the random generators are not restored')
        else:
            set_random_states(loaded[dist.get_rank()])
            runner.logger.info('RandomStateHook: random generators restored '
                               'from the checkpoint')


def get_random_states() -> dict:
    """The states of torch's (CPU, each CUDA device), numpy's and Python's
    global random generators, in plain types and tensors."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return dict(
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all()
        if torch.cuda.is_available() else [],
        numpy=dict(
            kind=kind,
            keys=torch.from_numpy(keys.astype(np.int64)),
            pos=int(pos),
            has_gauss=int(has_gauss),
            cached_gaussian=float(cached_gaussian)),
        python=dict(
            version=version, internal=list(internal), gauss_next=gauss_next))


def set_random_states(states: dict) -> None:
    """Restore what :func:`get_random_states` returned.

    CUDA devices are restored up to the number both the states and this
    process have.
    """
    torch.set_rng_state(states['torch'])
    if states['cuda'] and torch.cuda.is_available():
        count = min(len(states['cuda']), torch.cuda.device_count())
        for index in range(count):
            torch.cuda.set_rng_state(states['cuda'][index], index)
    numpy = states['numpy']
    np.random.set_state(
        (numpy['kind'], numpy['keys'].numpy().astype(np.uint32), numpy['pos'],
         numpy['has_gauss'], numpy['cached_gaussian']))
    python = states['python']
    random.setstate((python['version'], tuple(python['internal']),
                     python['gauss_next']))
