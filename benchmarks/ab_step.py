"""A/B of settings on one training or inference step, alternated in one
process.

    python benchmarks/ab_step.py mask-rcnn-vmamba-t --mode amp --amp-dtype float16 \\
        --setting 'main' \\
        --setting 'kept gate=model:recompute_gate=False' \\
        --setting 'chunks 8=env:MMVMAMBA_SCAN_SEGMENT_CHUNKS=8' \\
        --setting 'aten gate=mmvmamba.models.backbones.common:GATE_BACKWARD_ON_TRITON=False'
    python benchmarks/ab_step.py vmamba-t --mode train-bf16 --setting main \\
        --setting 'ATen norms=mmvmamba.ops.layer_norm:TRITON_DEVICE_TYPES=()'

The model and its step are those of ``profile_step.py`` (a classifier's
``--mode`` step, or a detector's backbone alone). Each ``--setting`` is
``LABEL[=CHANGE;CHANGE...]``, a change one of

- ``MODULE:NAME=VALUE``: an attribute of an importable module (an op's
  switch or launch constant), VALUE a Python literal;
- ``model:NAME=VALUE``: that attribute of every submodule of the model that
  has it (``recompute_gate`` of VMamba's SS2D, ...); ``model[PATTERN]:``
  of those whose qualified name matches the ``fnmatch`` pattern
  (``model[*stages.[123].*]:triton_when_recorded=False``: the norms of
  VMamba's last three stages on ATen in training);
- ``env:VAR=TEXT``: an environment variable (the CUDA scans read
  ``MMVMAMBA_SCAN_SEGMENT_CHUNKS`` at each call).

A label alone changes nothing (the baseline). In each of ``--rounds``
rounds every setting is applied in turn, its step run ``--warmup`` times,
then timed, and undone: on a GPU the step's busy time (its kernels and
copies, ``torch.profiler``), which host noise does not move; on the CPU its
median wall time over ``--repeat`` steps. The table gives every round's
time, their median and its ratio to the first setting's. cuDNN's autotuner
is off for a detector's backbone (as mmdet's and mmseg's runtimes set it),
on for a classifier (as ``benchmark.py throughput``).
"""
import argparse
import ast
import fnmatch
import importlib
import os
import statistics
from contextlib import ExitStack, contextmanager
from typing import (Callable, Dict, Iterator, List, NamedTuple, Optional,
                    Tuple)
from unittest.mock import patch

import torch
import torch.nn as nn
from profile_step import (add_step_arguments, build_step,
                          resolve_step_arguments, step_label)
from timing import (check_cli_args, device_name, gpu_time, measure,
                    module_settings, print_table)


class Setting(NamedTuple):
    """A labelled set of changes: ``(target, name, value)`` each, target
    ``'env'``, ``'model'``, ``'model[PATTERN]'`` or a module's import
    path."""
    label: str
    changes: Tuple[Tuple[str, str, object], ...]


def parse_setting(text: str) -> Setting:
    """A :class:`Setting` from ``LABEL[=CHANGE;CHANGE...]``.

    Raises:
        ValueError: Naming the part that is not ``TARGET:NAME=VALUE`` or
            whose value is not a Python literal.
    """
    label, _, rest = text.partition('=')
    if not label.strip():
        raise ValueError(f'setting {text!r} has no label')
    changes = []
    for change in filter(None, (c.strip() for c in rest.split(';'))):
        target, colon, assignment = change.partition(':')
        name, equals, value = assignment.partition('=')
        if not (colon and equals and target.strip() and name.strip()):
            raise ValueError(f'change {change!r} of setting {label!r} is not '
                             'TARGET:NAME=VALUE')
        target, name = target.strip(), name.strip()
        if target != 'env':
            try:
                value = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                raise ValueError(
                    f'value {value!r} of {target}:{name} in setting '
                    f'{label!r} is not a Python literal') from None
        changes.append((target, name, value))
    return Setting(label.strip(), tuple(changes))


def _model_pattern(target: str) -> Optional[str]:
    """The module-name pattern of a ``model`` or ``model[PATTERN]`` target
    (``'*'`` for the first), None for another target."""
    if target == 'model':
        return '*'
    if target.startswith('model[') and target.endswith(']'):
        return target[len('model['):-1]
    return None


@contextmanager
def _model_attribute(model: nn.Module, pattern: str, name: str,
                     value: object) -> Iterator[None]:
    """Set attribute ``name`` of every submodule of ``model`` that has it
    and whose qualified name matches ``pattern`` (restored after).

    Raises:
        AttributeError: If no such submodule has it.
    """
    owners = [m for qualified, m in model.named_modules()
              if fnmatch.fnmatchcase(qualified, pattern) and hasattr(m, name)]
    if not owners:
        where = '' if pattern == '*' else f' named like {pattern!r}'
        raise AttributeError(f'no module of the model{where} has an '
                             f'attribute {name!r} to set')
    with ExitStack() as stack:
        for m in owners:
            stack.enter_context(module_settings(m, **{name: value}))
        yield


@contextmanager
def applied(setting: Setting, model: nn.Module) -> Iterator[None]:
    """The changes of ``setting`` in a block, undone after (errors too)."""
    with ExitStack() as stack:
        for target, name, value in setting.changes:
            if target == 'env':
                stack.enter_context(patch.dict(os.environ, {name: value}))
            elif (pattern := _model_pattern(target)) is not None:
                stack.enter_context(
                    _model_attribute(model, pattern, name, value))
            else:
                module = importlib.import_module(target)
                stack.enter_context(module_settings(module, **{name: value}))
        yield


def compare(step: Callable[[], None], model: nn.Module,
            settings: List[Setting], time_step: Callable[[], float],
            rounds: int, warmup: int) -> Dict[str, List[float]]:
    """Time ``step`` under each setting in turn, ``rounds`` times.

    Args:
        step (Callable): The step.
        model (nn.Module): Its model (for ``model:`` changes).
        settings (list[Setting]): The settings, in the order they run.
        time_step (Callable): Times the step once as it stands, in ms.
        rounds (int): Rounds over all settings.
        warmup (int): Untimed steps under each setting before its timing.

    Returns:
        dict: Each label's times in ms, one a round.
    """
    times = {s.label: [] for s in settings}
    for _ in range(rounds):
        for setting in settings:
            with applied(setting, model):
                for _ in range(warmup):
                    step()
                times[setting.label].append(time_step())
    return times


def prepare_device(device: torch.device, detector: bool) -> None:
    """On a GPU: make ``device`` the current one where it names an index,
    and set cuDNN's autotuner as the step's runtime does (off for a
    detector's backbone, on for a classifier)."""
    if device.type != 'cuda':
        return
    if device.index is not None:
        torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = not detector


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; a setting that does not parse, a repeated label,
    or a mode, batch or size that does not fit the model is an error."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_step_arguments(parser)
    parser.add_argument(
        '--setting', action='append', required=True,
        help='LABEL[=TARGET:NAME=VALUE;...] (TARGET: a module, model, '
        'model[PATTERN] or env); repeat for each setting, the first is the '
        'baseline')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=2,
                        help='untimed steps under a setting before its '
                        'timing (default 2)')
    parser.add_argument('--repeat', type=int, default=5,
                        help='timed steps a round on the CPU, their median '
                        '(default 5; a GPU times one step by its kernels)')
    parser.add_argument('--device', default='cuda' if
                        torch.cuda.is_available() else 'cpu',
                        help='cpu or cuda[:N] (default: cuda if there is '
                        'a GPU)')
    args = parser.parse_args(argv)
    resolve_step_arguments(parser, args)
    check_cli_args(parser, args, dict(rounds=1, warmup=0, repeat=1))
    try:
        args.setting = [parse_setting(s) for s in args.setting]
    except ValueError as error:
        parser.error(f'--setting: {error}')
    for setting in args.setting:
        for target, name, _ in setting.changes:
            if target == 'env' or _model_pattern(target) is not None:
                continue
            try:
                module = importlib.import_module(target)
            except ImportError as error:
                parser.error(f'--setting {setting.label!r}: cannot import '
                             f'{target!r} ({error})')
            if not hasattr(module, name):
                parser.error(f'--setting {setting.label!r}: {target} has '
                             f'no attribute {name!r}')
    labels = [s.label for s in args.setting]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        parser.error(f'--setting: labels must differ, repeated: {repeated}')
    return args


def main(argv=None) -> Dict[str, List[float]]:
    args = parse_args(argv)
    device = torch.device(args.device)
    prepare_device(device, args.detector)
    model, step = build_step(args, device)
    for setting in args.setting:  # a model attribute the model lacks
        try:
            with applied(setting, model):
                pass
        except AttributeError as error:
            raise SystemExit(f'ab_step.py: error: --setting '
                             f'{setting.label!r}: {error}') from None
    if device.type == 'cuda':
        what = 'busy GPU ms (kernels and copies of one step)'

        def time_step() -> float:
            return gpu_time(step, device)['gpu_ms']
    else:
        what = f'median wall ms of {args.repeat} steps'

        def time_step() -> float:
            return measure(step, device, 0, args.repeat)

    times = compare(step, model, args.setting, time_step, args.rounds,
                    args.warmup)
    base = statistics.median(times[args.setting[0].label])
    rows = []
    for setting in args.setting:
        median = statistics.median(times[setting.label])
        rows.append([
            setting.label, ' '.join(f'{t:.2f}' for t in times[setting.label]),
            f'{median:.2f}', f'{median / base:.3f}'
        ])
    print_table(
        f'{step_label(args)}, {device_name(device)}: {what}, settings '
        f'alternated, {args.rounds} rounds',
        ['setting', 'rounds (ms)', 'median', f'/ {args.setting[0].label}'],
        rows)
    return times


if __name__ == '__main__':
    main()
