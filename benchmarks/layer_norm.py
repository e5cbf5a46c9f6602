"""LayerNorm timings at VMamba-T / VMamba2-T stage shapes: ATen against
Triton.

    python benchmarks/layer_norm.py [--batch 128] [--dtypes float32 bfloat16]
        [--warmup 5] [--repeat 50] [--sweep] [--add-norm]
        [--models vmamba2-t vmamba-t] [--modes infer-bf16 train-bf16]
    python benchmarks/layer_norm.py --host [--repeat 50]

For each stage map (batch, H, W, C) of the models at 224 (C = 96, 192, 384,
768) and each input dtype, under bf16 autocast as the backbones run (so a
bfloat16 map is normalised in float32, the result float32): forward
(without autograd) and forward+backward (the gradients of the map, the
weight and the bias from a float32 gradient of the output) time of
``F.layer_norm`` (ATen; autocast copies a bfloat16 map to float32 first) and
of :func:`mmvmamba.ops.layer_norm.layer_norm` (Triton, which reads the map
as it is), median after warm-up on CUDA events. Beside them the bytes the op
must move at least (forward: the map read, the float32 output written;
backward: the map and the output gradient read, the map's gradient written;
parameters and per-row statistics left out), that over the device-to-device
copy bandwidth measured in the same run (the floor), each time over the
floor and ATen's time over Triton's.

``--sweep``: also times the Triton kernels at other launch settings
(elements per tile, warps, backward programs per SM) and prints the fastest
for each row: the forward's (:func:`mmvmamba.ops.layer_norm.launch_config`)
on forward rows, the backward's
(:func:`mmvmamba.ops.layer_norm.backward_launch_config`, the forward at its
own) on forward+backward rows.

``--models``: classifier steps (``benchmark.py throughput``'s modes and
names) with the backbones' norms made ``nn.LayerNorm``, as they are
(:class:`mmvmamba.ops.LayerNorm`: the Triton forward where autograd does not
record, ``F.layer_norm`` where it does), and on the Triton kernels for
both (SS2D's ``out_norm``, called through ``F.layer_norm``, is not swapped).

``--gate`` (instead of the tables above): SS2D's output stage
``out_proj(LayerNorm(y) * SiLU(z))`` by ``RecomputedOutput``, forward and
backward (the gradients of y, z, the norm's weight and bias and out_proj's
weight from a fixed bfloat16 gradient) at VMamba-T's gate maps (batch, H,
W, E = 2C; y float32, z the bfloat16 second half of a (batch, H, W, 2E)
map, out_proj E -> C), under bf16 autocast, its backward on the ATen ops
and on the gate's Triton kernels (``GATE_BACKWARD_ON_TRITON`` off and
on); beside them out_proj alone (its forward and backward on a bfloat16
input, in both times) and the gate's time without it, against the bytes
the gate's kernels move at least (forward: y and z read, the bfloat16 gated
map written; backward: y, z and the gated map's gradient read, the gated
map written again for out_proj's weight gradient, the gradients of y and z
written) over the copy bandwidth. With ``--models``, ``train-bf16`` steps
of the classifiers with ``GATE_BACKWARD_ON_TRITON`` off and on.

    python benchmarks/layer_norm.py --gate [--sweep] [--models vmamba-t]

With ``--sweep`` it also times the gate's backward kernel at other launch
settings (for :func:`mmvmamba.ops.layer_norm.gate_backward_launch_config`).

``--host``: instead, the host's time of one call (microseconds, until it
returns; the GPU's work not awaited) at a small map (64 rows of C = 96,
float32), where the launch is all there is: ``F.layer_norm``,
:func:`mmvmamba.ops.layer_norm.layer_norm` where autograd does not record
(the kernel alone) and where it does (its autograd Function, which keeps
each row's statistics), :func:`~mmvmamba.ops.layer_norm.gated_layer_norm`,
:func:`~mmvmamba.ops.layer_norm.add_layer_norm`, and the forward kernel's
bare launch into preallocated tensors; each against ``F.layer_norm`` and
against the bare launch. At batch 2 the detectors' backbones are host-bound
(docs/benchmarks.md), so this is what a norm costs them.

    python benchmarks/layer_norm.py --host [--repeat 50]

``--add-norm``: instead, the residual add and the next block's norm of
VMamba's stages, at the same maps, without autograd under bf16 autocast
(``--dtypes``: the residual's dtype, the update bfloat16 as SS2D's output,
the norm written in bfloat16 for ``in_proj``): ``x + update`` then
:class:`mmvmamba.ops.LayerNorm` (two passes, the norm on Triton) against
:func:`mmvmamba.ops.layer_norm.add_layer_norm` (one), beside the fused
pass's floor (x and the update read, the sum and the norm written) and
whether both give the same sum and norm. With ``--models``, inference
steps (the ``infer-*`` modes) with ``vmamba.ADD_NORM_ON_TRITON`` off and
on (it changes VMamba v1 alone).

``--detectors``: instead, the fp32 training step of detector backbones at
batch 2 (``benchmark.py detectors``' backbone step, its default input), on
``F.layer_norm`` in training, on Triton for both passes, and on Triton for
the patch embedding's and the first two stages' norms only (the large
maps); the settings timed in turn in one process for ``--rounds`` rounds
(the host's time moves by up to 25% between processes): median host and
wall ms and the GPU's busy ms. Where the host bounds the step (UperNet),
the norms' host cost shows; where the GPU does (Mask R-CNN in fp32), their
GPU time::

    python benchmarks/layer_norm.py --detectors upernet-vmamba-t \\
        mask-rcnn-vmamba-t
"""
import argparse
import itertools
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from scan_timing import copy_bandwidth
from timing import (MODES, device_name, gpu_time, host_and_wall_ms, measure,
                    module_settings, print_floor_table, print_table,
                    switch_model_rows, time_mode)

from mmvmamba.models.backbones import common, vmamba
from mmvmamba.ops import layer_norm as ln

#: (H, W, C) of the four stages at 224 (VMamba-T and VMamba2-T alike).
STAGES = ((56, 56, 96), (28, 28, 192), (14, 14, 384), (7, 7, 768))
PASSES = ('fwd', 'fwd+bwd')


def floor_bytes(batch: int, height: int, width: int, channels: int,
                dtype: torch.dtype) -> Dict[str, int]:
    """Bytes a LayerNorm must move at least under autocast (float32 output
    and output gradient; the map and its gradient in ``dtype``)."""
    elements = batch * height * width * channels
    size = torch.empty(0, dtype=dtype).element_size()
    forward = elements * (size + 4)
    backward = elements * (size + 4 + size)
    return {'fwd': forward, 'fwd+bwd': forward + backward}


def stage_maps(batch: int, dtypes, device: torch.device):
    """Yield ``((H, W, C), dtype, x)`` for each stage of :data:`STAGES` and
    each of ``dtypes``: ``x`` a standard-normal ``(batch, H, W, C)`` map of
    that dtype."""
    for (height, width, channels), dtype in itertools.product(
            STAGES, dtypes):
        x = torch.randn(batch, height, width, channels, device=device)
        yield (height, width, channels), dtype, x.to(dtype)


def aten_layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def make_step(fn: Callable, x: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor, backward: bool) -> Callable[[], None]:
    """One call of ``fn`` under bf16 autocast; with ``backward``, also the
    gradients of x, weight and bias from a fixed float32 gradient."""
    grad = torch.randn(x.shape, device=x.device)

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            if not backward:
                with torch.no_grad():
                    fn(x, weight, bias, 1e-5)
                return
            y = fn(x, weight, bias, 1e-5)
        torch.autograd.grad(y, (x, weight, bias), grad)

    return step


def check_triton_path(x: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor) -> None:
    """Raise RuntimeError (with the reason) if
    :func:`mmvmamba.ops.layer_norm.layer_norm` would run ``F.layer_norm``
    on these inputs under the bf16 autocast of the timed steps."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        reason = ln.unsupported_reason(x, weight, bias)
    if reason is not None:
        raise RuntimeError(f'the Triton path would not run: {reason}')


def op_rows(batch: int, dtypes, warmup: int, repeat: int, sweep: bool,
            device='cuda') -> List[Dict]:
    """Time ATen and Triton at each stage, dtype and pass.

    Returns:
        list[dict]: One dict per row, then one with the copy bandwidth.
    """
    device = torch.device(device)
    bandwidth = copy_bandwidth(device)
    rows = []
    for (height, width, channels), dtype, x in stage_maps(batch, dtypes,
                                                          device):
        weight = 1 + 0.1 * torch.randn(channels, device=device)
        bias = 0.1 * torch.randn(channels, device=device)
        moved = floor_bytes(batch, height, width, channels, dtype)
        for name, backward in zip(PASSES, (False, True)):
            for t in (x, weight, bias):
                t.requires_grad_(backward)
            check_triton_path(x, weight, bias)
            times = {
                label: measure(make_step(fn, x, weight, bias, backward),
                               device, warmup, repeat)
                for label, fn in (('aten', aten_layer_norm),
                                  ('triton', ln.layer_norm))
            }
            floor_ms = moved[name] / bandwidth * 1e3
            row = dict(shape=f'{batch}x{height}x{width}x{channels}',
                       dtype=str(dtype).replace('torch.', ''), pass_=name,
                       aten_ms=times['aten'], triton_ms=times['triton'],
                       bytes=moved[name], floor_ms=floor_ms, best=None)
            if sweep:
                row['best'] = sweep_launch(x, weight, bias, backward, 2,
                                           max(10, repeat // 2))
            rows.append(row)
            torch.cuda.empty_cache()
    rows.append(dict(copy_gb_per_s=bandwidth / 1e9))
    return rows


def fastest_launch(step: Callable[[], None], config_name: str,
                   channels: int, tiles: Sequence[int], programs: bool,
                   label: str, device: torch.device, warmup: int,
                   repeat: int) -> Optional[str]:
    """Time ``step`` with ``ln.<config_name>`` (a kernel's launch setting)
    made each of ``tiles`` (elements, at least a row's channel block) x 4,
    8 and 16 warps, then (with ``programs``) 2 and 8 backward programs per
    SM at the fastest of those; a setting that fails is printed with
    ``label``, not timed. The module's settings are restored after each.

    Returns:
        str, optional: The fastest setting and its time, None if none ran.
    """
    block_c = ln.padded_channels(channels)
    # a setting with programs per SM in it (the gate's) takes per_sm there
    per_sm_in_config = len(getattr(ln, config_name)(channels)) == 4
    results = []

    def run(tile, warps, per_sm):
        config = (block_c, tile // block_c, warps) + (
            (per_sm, ) if per_sm_in_config else ())
        settings = {config_name: lambda c: config,
                    'BACKWARD_PROGRAMS_PER_SM': per_sm}
        try:
            with module_settings(ln, **settings):
                ms = measure(step, device, warmup, repeat)
        except Exception as error:  # noqa: BLE001 -- e.g. out of
            # resources at this setting: reported, not timed
            print(f'  {label} tile {tile} warps {warps}: '
                  f'{type(error).__name__}')
            return
        results.append((ms, tile, warps, per_sm))

    for tile in sorted({max(block_c, t) for t in tiles}):
        for warps in (4, 8, 16):
            run(tile, warps, ln.BACKWARD_PROGRAMS_PER_SM)
    if programs and results:
        _, tile, warps, _ = min(results)
        for per_sm in (2, 8):
            run(tile, warps, per_sm)
    if not results:
        return None
    ms, tile, warps, per_sm = min(results)
    text = f'{ms:.3f} ms: tile {tile}, {warps} warps'
    return text + (f', {per_sm}/SM' if programs else '')


def sweep_launch(x, weight, bias, backward: bool, warmup: int,
                 repeat: int) -> Optional[str]:
    """The fastest launch setting of the Triton kernel this row tunes (the
    forward's, or with ``backward`` the backward's): elements per tile x
    warps, then (backward) programs per SM at the fastest of those
    (:func:`fastest_launch`)."""
    channels = x.shape[-1]
    return fastest_launch(
        make_step(ln.layer_norm, x, weight, bias, backward),
        'backward_launch_config' if backward else 'launch_config', channels,
        (2048, 4096, 8192), backward, f'C={channels}', x.device, warmup,
        repeat)


#: The norm settings of :func:`model_rows`: (class, triton_when_recorded).
NORM_SETTINGS = {
    'aten': (torch.nn.LayerNorm, False),
    'forward': (ln.LayerNorm, False),
    'both': (ln.LayerNorm, True),
}


def set_norms(norms: List[torch.nn.Module], setting: str) -> None:
    """Make each of ``norms`` run as :data:`NORM_SETTINGS` ``[setting]``
    says: ``nn.LayerNorm``, the Triton forward where autograd does not
    record, or Triton for both passes (the LayerNorm classes add no state
    to ``nn.LayerNorm``: the modules, parameters and keys stay)."""
    cls, when_recorded = NORM_SETTINGS[setting]
    for module in norms:
        module.__class__ = cls
        module.triton_when_recorded = when_recorded


def model_rows(names, modes, batch: int, warmup: int,
               repeat: int) -> List[Dict]:
    """Classifier steps with the backbones' LayerNorms as nn.LayerNorm, on
    the Triton forward alone and (training) on Triton for both passes; each
    row also says which of the last two the backbone runs (``default``)."""
    from models import build_classifier, model_label, tensor_forward
    device = torch.device('cuda')
    rows = []
    for name in names:
        model = tensor_forward(
            build_classifier(name).to(device), 'mmpretrain', batch,
            (224, 224))
        norms = [m for m in model.modules() if type(m) is ln.LayerNorm]
        built = [m.triton_when_recorded for m in norms]
        default = ('both' if all(built) else
                   'forward' if not any(built) else 'mixed')
        for mode in modes:
            times = {}
            for key in NORM_SETTINGS:
                if key == 'both' and not mode.startswith('train'):
                    continue  # the same calls as the forward's
                set_norms(norms, key)
                times[key] = time_mode(model, mode, batch, 224, device,
                                       warmup, repeat)
            for module, when_recorded in zip(norms, built):
                module.__class__ = ln.LayerNorm
                module.triton_when_recorded = when_recorded
            rows.append(dict(model=model_label(name), mode=mode,
                             norms=len(norms), default=default, **times))
        del model
        torch.cuda.empty_cache()
    return rows


#: Which of a detector backbone's LayerNorms run Triton in training in each
#: setting of :func:`detector_rows` (the others ``F.layer_norm``), by the
#: norm's name in the backbone.
DETECTOR_NORM_SETTINGS = {
    'aten': lambda name: False,
    'triton': lambda name: True,
    'triton-early': lambda name: name.startswith(
        ('patch_embed.', 'stages.0.', 'stages.1.')),
}


def detector_rows(names: Sequence[str], device: torch.device,
                  rounds: int = 3, warmup: int = 3,
                  repeat: int = 10) -> List[Dict]:
    """fp32 backbone training steps of detectors at batch 2 with the norms
    of each :data:`DETECTOR_NORM_SETTINGS` setting, timed in turn.

    Returns:
        list[dict]: One a model and setting: ``model``, ``norms`` (the
        setting), ``triton`` (norms on Triton in training), ``host_ms`` and
        ``wall_ms`` (medians over the rounds of :func:`host_and_wall_ms`),
        ``busy_ms`` (:func:`gpu_time`; None off a GPU).
    """
    import detectors
    rows = []
    for name in names:
        cfg = detectors.load_detector_config(name)
        scope = detectors.scope_of(cfg)
        model = detectors.build_detector(cfg, device)
        data = detectors.synthetic_batch(model, scope, 2,
                                         detectors.TASKS[scope][1])
        step = detectors.backbone_step(model, 'fp32', data, device)
        norms = {n: m for n, m in model.backbone.named_modules()
                 if isinstance(m, ln.LayerNorm)}
        built = {n: m.triton_when_recorded for n, m in norms.items()}

        def use(setting):
            on = DETECTOR_NORM_SETTINGS[setting]
            for norm_name, module in norms.items():
                module.triton_when_recorded = on(norm_name)

        times = {setting: [] for setting in DETECTOR_NORM_SETTINGS}
        for _ in range(rounds):
            for setting in DETECTOR_NORM_SETTINGS:
                use(setting)
                times[setting].append(
                    host_and_wall_ms(step, device, warmup, repeat))
        for setting, pairs in times.items():
            use(setting)
            rows.append(dict(
                model=name, norms=setting,
                triton=sum(m.triton_when_recorded for m in norms.values()),
                host_ms=statistics.median(h for h, _ in pairs),
                wall_ms=statistics.median(w for _, w in pairs),
                busy_ms=gpu_time(step, device)['gpu_ms']))
        for norm_name, module in norms.items():
            module.triton_when_recorded = built[norm_name]
        del model, data, step
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    return rows


def print_detector_table(rows: List[Dict], rounds: int) -> None:
    """The table of :func:`detector_rows`."""
    print_table(
        'Detector backbones, fp32 training step at batch 2: LayerNorms on '
        'F.layer_norm (aten), on Triton (triton) or on Triton for the patch '
        'embedding and stages 0-1 (triton-early) in training; medians of '
        f'{rounds} rounds, the settings in turn',
        ['model', 'norms', 'on Triton', 'host ms', 'wall ms', 'busy ms'],
        [[r['model'], r['norms'], r['triton'], _fmt(r['host_ms'], '.1f'),
          _fmt(r['wall_ms'], '.1f'), _fmt(r['busy_ms'], '.2f')]
         for r in rows])


#: VMamba-T's gate per stage at 224: (H, W, E = 2C, C).
GATE_STAGES = ((56, 56, 192, 96), (28, 28, 384, 192), (14, 14, 768, 384),
               (7, 7, 1536, 768))


def gate_floor_bytes(batch: int, height: int, width: int,
                     inner: int) -> int:
    """Bytes the gate's kernels move at least in a forward and backward
    under bf16 autocast (y float32, z, the gated map and its gradient
    bfloat16): forward y + z read, gated written; backward y + z + the
    gradient read, gated written again, y's and z's gradients written."""
    elements = batch * height * width * inner
    forward = elements * (4 + 2 + 2)
    backward = elements * (4 + 2 + 2 + 2 + 4 + 2)
    return forward + backward


def gate_inputs(batch: int, height: int, width: int, inner: int,
                channels: int, device) -> Dict:
    """Random inputs of SS2D's output stage at one stage (see
    :func:`gate_rows`), all requiring gradients."""
    y = torch.randn(batch, height, width, inner, device=device)
    z = torch.randn(batch, height, width, 2 * inner, device=device,
                    dtype=torch.bfloat16)[..., inner:]
    norm = torch.nn.LayerNorm(inner).to(device)
    proj = torch.nn.Linear(inner, channels, bias=False).to(device)
    with torch.no_grad():
        norm.weight.normal_(1, 0.1)
        norm.bias.normal_(0, 0.1)
    grad = torch.randn(batch, height, width, channels, device=device,
                       dtype=torch.bfloat16)
    return dict(y=y.requires_grad_(), z=z.requires_grad_(), norm=norm,
                proj=proj, grad=grad)


def make_gate_step(y, z, norm, proj, grad) -> Callable[[], None]:
    """RecomputedOutput's forward under bf16 autocast and its backward."""
    wrt = (y, z, norm.weight, norm.bias, proj.weight)

    def step():
        with torch.autocast(y.device.type, dtype=torch.bfloat16):
            out = common.ss2d_output(y, z, norm, proj, recompute=True)
        torch.autograd.grad(out, wrt, grad)

    return step


def make_linear_step(y, proj, grad) -> Callable[[], None]:
    """out_proj alone on a bfloat16 input, forward and backward (the
    gradients of its input and weight)."""
    gated = y.detach().bfloat16().requires_grad_()

    def step():
        with torch.autocast(y.device.type, dtype=torch.bfloat16):
            out = proj(gated)
        torch.autograd.grad(out, (gated, proj.weight), grad)

    return step


def check_gate_triton_path(y, z, norm) -> None:
    """Raise RuntimeError (with the reason) if RecomputedOutput's backward
    would not run the Triton kernels with the policy on (under no_grad, as
    a backward runs)."""
    with module_settings(common, GATE_BACKWARD_ON_TRITON=True), \
            torch.no_grad():
        reason = common.gate_backward_reason(y, z, norm.weight, norm.bias,
                                             torch.bfloat16)
    if reason is not None:
        raise RuntimeError(f'the Triton gate backward would not run: '
                           f'{reason}')


def sweep_gate_launch(step: Callable[[], None], channels: int,
                      device: torch.device, warmup: int,
                      repeat: int) -> Optional[str]:
    """The fastest launch setting of the gate's backward kernel for this
    row (``step`` timed with the Triton backward): elements per tile x
    warps, then programs per SM at the fastest of those
    (:func:`fastest_launch`)."""
    with module_settings(common, GATE_BACKWARD_ON_TRITON=True):
        return fastest_launch(step, 'gate_backward_launch_config', channels,
                              (1024, 2048, 4096), True, f'E={channels}',
                              device, warmup, repeat)


def gate_rows(batch: int, warmup: int, repeat: int, sweep: bool = False,
              device='cuda') -> List[Dict]:
    """Time RecomputedOutput on ATen's and on Triton's backward, and
    out_proj alone, at each of :data:`GATE_STAGES` (with ``sweep``, also
    the gate's backward kernel at other launch settings).

    Returns:
        list[dict]: One dict per stage, then one with the copy bandwidth.
    """
    device = torch.device(device)
    bandwidth = copy_bandwidth(device)
    rows = []
    for height, width, inner, channels in GATE_STAGES:
        inputs = gate_inputs(batch, height, width, inner, channels, device)
        check_gate_triton_path(inputs['y'], inputs['z'], inputs['norm'])
        step = make_gate_step(**inputs)
        times = {}
        for key, on in (('aten', False), ('triton', True)):
            with module_settings(common, GATE_BACKWARD_ON_TRITON=on):
                times[key] = measure(step, device, warmup, repeat)
        times['linear'] = measure(
            make_linear_step(inputs['y'], inputs['proj'], inputs['grad']),
            device, warmup, repeat)
        moved = gate_floor_bytes(batch, height, width, inner)
        best = (sweep_gate_launch(step, inner, device, warmup, repeat)
                if sweep else None)
        rows.append(dict(shape=f'{batch}x{height}x{width}x{inner}',
                         channels=channels, bytes=moved,
                         floor_ms=moved / bandwidth * 1e3, best=best,
                         **times))
        del inputs, step
    rows.append(dict(copy_gb_per_s=bandwidth / 1e9))
    return rows


def add_norm_floor_bytes(batch: int, height: int, width: int, channels: int,
                         dtype: torch.dtype) -> int:
    """Bytes the fused add + norm must move at least: a ``dtype`` residual
    and a bfloat16 update read, their sum (the promoted dtype) and a
    bfloat16 norm written."""
    elements = batch * height * width * channels
    sum_dtype = torch.promote_types(dtype, torch.bfloat16)
    sizes = [torch.empty(0, dtype=d).element_size()
             for d in (dtype, torch.bfloat16, sum_dtype, torch.bfloat16)]
    return elements * sum(sizes)


def check_add_norm_paths(x: torch.Tensor, update: torch.Tensor,
                         norm: ln.LayerNorm) -> None:
    """Raise RuntimeError (with the reason) if, under the bf16 autocast and
    ``no_grad`` of the timed steps, the fused kernel or the unfused norm's
    Triton kernel would not run."""
    with torch.no_grad(), torch.autocast(x.device.type,
                                         dtype=torch.bfloat16):
        reasons = (ln.add_unsupported_reason(x, update, norm.weight,
                                             norm.bias, norm.output_dtype(x)),
                   ln.unsupported_reason(x + update, norm.weight, norm.bias))
    for name, reason in zip(('add_layer_norm', 'LayerNorm'), reasons):
        if reason is not None:
            raise RuntimeError(f'the {name} kernel would not run: {reason}')


def add_norm_rows(batch: int, dtypes, warmup: int, repeat: int,
                  device='cuda') -> List[Dict]:
    """Time ``x + update`` then the norm against the fused kernel at each
    stage and residual dtype: a list of rows (dicts), the last one the copy
    bandwidth."""
    device = torch.device(device)
    bandwidth, rows = copy_bandwidth(device), []
    for (height, width, channels), dtype, x in stage_maps(batch, dtypes,
                                                          device):
        shape = x.shape
        update = torch.randn(shape, device=device).bfloat16()
        norm = ln.LayerNorm(channels, linear_input=True).to(device)
        with torch.no_grad():
            norm.weight.normal_(1, 0.1)
            norm.bias.normal_(0, 0.1)
        check_add_norm_paths(x, update, norm)

        def unfused():
            total = x + update
            return total, norm(total)

        def fused():
            return ln.add_layer_norm(x, update, norm.weight, norm.bias,
                                     norm.eps, norm.output_dtype(x))

        results, times = [], {}
        for label, fn in (('unfused', unfused), ('fused', fused)):

            def step(fn=fn):
                with torch.no_grad(), torch.autocast(device.type,
                                                     dtype=torch.bfloat16):
                    return fn()

            results.append(step())
            times[label] = measure(step, device, warmup, repeat)
        (total, normed), (fused_total, fused_normed) = results
        moved = add_norm_floor_bytes(batch, height, width, channels, dtype)
        rows.append(dict(
            shape='x'.join(map(str, shape)),
            dtype=str(dtype).replace('torch.', ''),
            unfused_ms=times['unfused'], fused_ms=times['fused'],
            bytes=moved, floor_ms=moved / bandwidth * 1e3,
            same_sum=torch.equal(total, fused_total),
            norm_diff=float((normed.float() - fused_normed.float()).abs()
                            .max())))
        del x, update, results, total, normed, fused_total, fused_normed
        torch.cuda.empty_cache()
    rows.append(dict(copy_gb_per_s=bandwidth / 1e9))
    return rows


def print_gate_model_table(results: List[Dict], batch: int) -> None:
    """The classifiers' table of ``--gate``: rows of
    :func:`timing.switch_model_rows` (``off``: ATen, ``on``: Triton)."""
    print_table(
        f'Classifier train-bf16 steps, batch {batch} at 224, the '
        'gate\'s backward on ATen / on Triton',
        ['model', 'ATen ms', 'Triton ms', 'img/s ATen', 'img/s Triton',
         'speed-up'],
        [[r['model'], _fmt(r['off']['ms'], '.1f'),
          _fmt(r['on']['ms'], '.1f'),
          _fmt(r['off']['img_per_s'], '.0f'),
          _fmt(r['on']['img_per_s'], '.0f'),
          _speed_up(r, 'on', 'off')]
         for r in results])


def print_gate_tables(args, device) -> List[Dict]:
    """``--gate``: the op's table, and the classifiers' with ``--models``.
    """
    rows = gate_rows(args.batch, args.warmup, args.repeat, args.sweep, device)
    meta = rows.pop()
    table = []
    for r in rows:
        gates = [r[key] - r['linear'] for key in ('aten', 'triton')]
        table.append([
            r['shape'], r['channels'], _fmt(r['aten']), _fmt(r['triton']),
            _fmt(r['aten'] / r['triton'], '.2f'), _fmt(r['linear']),
            _fmt(gates[0]), _fmt(gates[1]),
            _fmt(gates[0] / gates[1], '.2f') if gates[1] > 0 else '-',
            f'{r["bytes"] / 1e9:.3f}', _fmt(r['floor_ms']),
            _fmt(gates[1] / r['floor_ms'], '.2f')] +
            ([r['best'] or '-'] if args.sweep else []))
    print_table(
        f'RecomputedOutput forward+backward under bf16 autocast (y float32, '
        f'z bf16), backward on ATen / on Triton (GATE_BACKWARD_ON_TRITON), '
        f'{device_name(device)}, copy bandwidth '
        f'{meta["copy_gb_per_s"]:.0f} GB/s, median of {args.repeat}',
        ['gate map', 'C out', 'ATen ms', 'Triton ms', 'ATen / Triton',
         'out_proj ms', 'ATen gate ms', 'Triton gate ms',
         'gate ATen / Triton', 'GB moved', 'floor ms', 'Triton gate x floor'
         ] + (['fastest Triton backward setting'] if args.sweep else []),
        table)
    if args.models:
        results = switch_model_rows(args.models, ['train-bf16'], args.batch,
                                    args.warmup, max(10, args.repeat // 5),
                                    common, 'GATE_BACKWARD_ON_TRITON')
        print_gate_model_table(results, args.batch)
        rows = rows + results
    return rows


def print_add_norm_model_table(results: List[Dict], batch: int) -> None:
    """The classifiers' table of ``--add-norm``: rows of
    :func:`timing.switch_model_rows`."""
    print_table(
        f'Inference steps, batch {batch} at 224, '
        'vmamba.ADD_NORM_ON_TRITON off and on (VMamba v1 alone; '
        'training steps do not take it)',
        ['model', 'mode', 'off ms', 'on ms', 'img/s off', 'img/s on',
         'on speed-up'],
        [[r['model'], r['mode'], _fmt(r['off']['ms'], '.1f'),
          _fmt(r['on']['ms'], '.1f'),
          _fmt(r['off']['img_per_s'], '.0f'),
          _fmt(r['on']['img_per_s'], '.0f'),
          _speed_up(r, 'on', 'off', '.3f')]
         for r in results])


def print_add_norm(args, device) -> List[Dict]:
    """The ``--add-norm`` tables (and with ``--models``, the steps)."""
    rows = add_norm_rows(args.batch, [getattr(torch, d) for d in args.dtypes],
                         args.warmup, args.repeat, device)
    meta = rows.pop()
    print_table(
        'Residual add + LayerNorm without autograd under bf16 autocast (a '
        'bfloat16 update, a bfloat16 norm): x + update then LayerNorm '
        f'against add_layer_norm, {device_name(device)}, copy bandwidth '
        f'{meta["copy_gb_per_s"]:.0f} GB/s, median of {args.repeat}',
        ['map', 'x dtype', 'add + norm ms', 'fused ms', 'speed-up',
         'GB moved (fused)', 'floor ms', 'add + norm x floor',
         'fused x floor', 'same sum', 'norm max diff'],
        [[r['shape'], r['dtype'], _fmt(r['unfused_ms']), _fmt(r['fused_ms']),
          _fmt(r['unfused_ms'] / r['fused_ms'], '.2f'),
          f'{r["bytes"] / 1e9:.3f}', _fmt(r['floor_ms']),
          _fmt(r['unfused_ms'] / r['floor_ms'], '.2f'),
          _fmt(r['fused_ms'] / r['floor_ms'], '.2f'), r['same_sum'],
          _fmt(r['norm_diff'], '.3g')] for r in rows])
    modes = [m for m in args.modes if m.startswith('infer')]
    if args.models and modes:
        results = switch_model_rows(args.models, modes, args.batch,
                                    args.warmup, max(10, args.repeat // 5),
                                    vmamba, 'ADD_NORM_ON_TRITON')
        print_add_norm_model_table(results, args.batch)
    return rows


#: Map of the ``--host`` table: rows, C.
HOST_MAP = (64, 96)


def host_us_per_call(fn: Callable[[], object], device: torch.device,
                     calls: int, rounds: int) -> float:
    """Median over ``rounds`` of the host's microseconds a call of ``fn``
    over ``calls`` calls in a row (the device synchronised before each
    round, not awaited within it)."""
    for _ in range(calls):
        fn()
    times = []
    for _ in range(rounds):
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return statistics.median(times)


def host_rows(device: torch.device, calls: int = 200,
              rounds: int = 15) -> List[Dict]:
    """The ``--host`` table's rows: ``call``, ``us`` (host time a call) and
    its ratios to ``F.layer_norm``'s and to the bare launch's."""
    rows_, channels = HOST_MAP
    x = torch.randn(rows_, channels, device=device)
    z = torch.randn_like(x)
    weight = torch.ones(channels, device=device)
    bias = torch.zeros(channels, device=device)
    recorded = x.clone().requires_grad_()
    y, mean, rstd = (torch.empty_like(x), torch.empty(rows_, device=device),
                     torch.empty(rows_, device=device))

    def bare_launch():
        ln._launch_forward(x, y, weight, bias, 1e-5, stats=(mean, rstd))

    calls_ = {
        'F.layer_norm': lambda: F.layer_norm(x, (channels, ), weight, bias),
        'layer_norm, not recorded': lambda: ln.layer_norm(x, weight, bias),
        'layer_norm, recorded (Function)':
        lambda: ln.layer_norm(recorded, weight, bias),
        'gated_layer_norm': lambda: ln.gated_layer_norm(x, z, weight, bias),
        'add_layer_norm': lambda: ln.add_layer_norm(x, z, weight, bias),
        'bare launch (_launch_forward)': bare_launch,
    }
    times = {}
    for name, fn in calls_.items():
        grad = torch.enable_grad() if 'recorded' in name else torch.no_grad()
        with grad:
            times[name] = host_us_per_call(fn, device, calls, rounds)
    aten, bare = times['F.layer_norm'], times['bare launch (_launch_forward)']
    return [dict(call=name, us=us, vs_aten=us / aten, vs_bare=us / bare)
            for name, us in times.items()]


def print_host_table(device: torch.device, repeat: int) -> List[Dict]:
    """Print :func:`host_rows` (``repeat`` rounds)."""
    rows = host_rows(device, rounds=repeat)
    print_table(
        f'Host time of one LayerNorm call, {HOST_MAP[0]} x {HOST_MAP[1]} '
        f'float32, {device_name(device)}, median of {repeat} rounds of 200 '
        'calls', ['call', 'host us', 'x F.layer_norm', 'x bare launch'],
        [[r['call'], _fmt(r['us'], '.1f'), _fmt(r['vs_aten'], '.2f'),
          _fmt(r['vs_bare'], '.2f')] for r in rows])
    return rows


def _fmt(value, spec='.3f'):
    return '-' if value is None else format(value, spec)


def _speed_up(row: Dict, key: str, reference: str = 'aten',
              spec: str = '.2f') -> str:
    """The ``reference`` column's time (nn.LayerNorm's by default) over the
    ``key`` column's, or '-'."""
    if key not in row or not row[reference]['ms'] or not row[key]['ms']:
        return '-'
    return _fmt(row[reference]['ms'] / row[key]['ms'], spec)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16'],
                        choices=['float32', 'bfloat16', 'float16'])
    parser.add_argument('--warmup', type=int, default=5)
    parser.add_argument('--repeat', type=int, default=50)
    parser.add_argument('--sweep', action='store_true',
                        help='also time other launch settings')
    parser.add_argument('--add-norm', action='store_true',
                        help='time the residual add + norm of VMamba\'s '
                        'stages, unfused against add_layer_norm')
    parser.add_argument('--models', nargs='*', default=[],
                        help='classifier names of benchmark.py throughput')
    parser.add_argument('--modes', nargs='+', choices=MODES,
                        default=['infer-bf16', 'train-bf16'])
    parser.add_argument('--host', action='store_true',
                        help='time the host\'s cost of one call instead')
    parser.add_argument('--gate', action='store_true',
                        help="time SS2D's output stage with the gate's "
                        'backward on ATen and on Triton instead')
    parser.add_argument('--detectors', nargs='+', metavar='NAME',
                        help='time these detectors\' backbone steps with '
                        'the norms on ATen and Triton in training instead '
                        '(names of benchmark.py detectors)')
    parser.add_argument('--rounds', type=int, default=3,
                        help='rounds of --detectors')
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f'--rounds must be at least 1, got {args.rounds}')
    if not torch.cuda.is_available():
        parser.error('layer_norm.py needs a GPU')
    if ln.TRITON_IMPORT_ERROR:
        parser.error(ln.TRITON_IMPORT_ERROR)
    device = torch.device('cuda')
    if args.detectors:
        rows = detector_rows(args.detectors, device, args.rounds,
                             args.warmup, args.repeat)
        print_detector_table(rows, args.rounds)
        return rows
    if args.host:
        return print_host_table(device, args.repeat)
    if args.add_norm:
        return print_add_norm(args, device)
    if args.gate:
        return print_gate_tables(args, device)
    rows = op_rows(args.batch, [getattr(torch, d) for d in args.dtypes],
                   args.warmup, args.repeat, args.sweep)
    meta = rows.pop()
    print_floor_table('LayerNorm under bf16 autocast (float32 output)', rows,
                      {'map': 'shape', 'x dtype': 'dtype', 'pass': 'pass_'},
                      'ATen', 'aten_ms', device, meta['copy_gb_per_s'],
                      args.repeat, args.sweep)
    if args.models:
        results = model_rows(args.models, args.modes, args.batch,
                             args.warmup, max(10, args.repeat // 5))
        print_table(
            f'Classifier steps, batch {args.batch} at 224: the norms as '
            'nn.LayerNorm, on the Triton forward where autograd does not '
            'record, and on Triton for both passes (out_norm not swapped); '
            'default: what the backbone runs',
            ['model', 'mode', 'norms', 'nn.LayerNorm ms', 'forward ms',
             'both ms', 'img/s nn', 'forward speed-up', 'both speed-up',
             'default'],
            [[r['model'], r['mode'], r['norms'],
              _fmt(r['aten']['ms'], '.1f'), _fmt(r['forward']['ms'], '.1f'),
              _fmt(r['both']['ms'], '.1f') if 'both' in r else '-',
              _fmt(r['aten']['img_per_s'], '.0f'),
              _speed_up(r, 'forward'), _speed_up(r, 'both'), r['default']]
             for r in results])
    return rows


if __name__ == '__main__':
    main()
