"""What VMamba and VMamba2 keep for the backward, block by block.

The savings, each bitwise-neutral: the SiLU taken inside the fused scan op
(its backward keeps the conv's output, not also the SiLU's),
``recompute_gate`` / ``recompute_norm`` (out_norm, the gate and out_proj's
input recomputed in the backward) and, for VMamba2, ``recompute_mlp`` (the
MLP's GELU recomputed, its output not kept). Each test runs the plain graph
(the SiLU before the op, nothing recomputed), each saving alone and all (the
default), checks outputs and gradients bit for bit (on the GPU, whose
kernels sum in an order of their own, to rounding), counts the bytes kept
per block with ``saved_tensors_hooks`` and prints the table (``pytest -rA``).
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from mmvmamba.models import VMamba, VMamba2
from mmvmamba.models.backbones import vmamba, vmamba2
from mmvmamba.ops import _ext, cross_selective_scan

DEVICES = [
    pytest.param('cpu', marks=pytest.mark.skipif(
        not _ext.has_cross_kernel('cpu'),
        reason='needs mmvmamba._C with the fused CPU kernel')),
    pytest.param('cuda', marks=pytest.mark.skipif(
        not (torch.cuda.is_available() and _ext.has_cross_kernel('cuda')),
        reason='needs a GPU and the fused CUDA kernel')),
]

# VMamba-T's shape (d_state 16, ssm_ratio 2, dt_rank C / 16) at a smaller
# width and depth; VMamba2-T's (d_state 1, ssm_ratio 1, an MLP). With the
# arguments of the output stage's and the MLP's recompute options.
MODELS = {
    'VMamba': (VMamba, dict(embed_dims=16, depths=[2, 2, 3, 2]),
               'recompute_gate', None),
    'VMamba2': (VMamba2, dict(embed_dims=16, depths=[1, 2, 2, 1],
                              ssm_ratio=1.0, d_state=1, mlp_ratio=4.0),
                'recompute_norm', 'recompute_mlp'),
}
# each variant: (SiLU in the op, recompute the output stage, the MLP)
VARIANTS = {
    'before': (False, False, False),
    'silu in op': (True, False, False),
    'recompute': (False, True, False),
    'mlp': (False, False, True),
    'default': (True, True, True),
}


@contextlib.contextmanager
def silu_before_the_op(enabled):
    """Within the block the backbones take the SiLU before the scan's op,
    as the plain graph does."""

    def plain(x, *args, silu=False, **kwargs):
        return cross_selective_scan(F.silu(x) if silu else x, *args, **kwargs)

    modules = (vmamba, vmamba2)
    for module in modules:
        module.cross_selective_scan = plain if enabled else \
            cross_selective_scan
    try:
        yield
    finally:
        for module in modules:
            module.cross_selective_scan = cross_selective_scan


def _scaled_difference(a, b):
    """The largest difference of ``b`` from ``a`` over ``a``'s largest
    magnitude."""
    scale = a.detach().abs().max().float().clamp_min(1e-30)
    return ((b.detach().float() - a.detach().float()).abs().max() /
            scale).item()


def blocks_of(model):
    return [block for stage in model.stages for block in stage.blocks]


def run(model, x, autocast):
    """Outputs, parameter gradients and the bytes of the distinct storages
    (parameters aside) autograd keeps, per block (``None``: outside the
    blocks), each counted at the block whose forward first kept it."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, per_block, current = set(), {}, [None]
    hooks = []
    for index, block in enumerate(blocks_of(model)):
        hooks.append(block.register_forward_pre_hook(
            lambda m, args, index=index: current.__setitem__(0, index)))
        hooks.append(block.register_forward_hook(
            lambda m, args, out: current.__setitem__(0, None)))

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in params and key not in seen:
            seen.add(key)
            per_block[current[0]] = per_block.get(current[0],
                                                  0) + storage.nbytes()
        return t

    torch.manual_seed(1)  # the same drop-path masks in every variant
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast(x.device.type, dtype=torch.bfloat16,
                           enabled=autocast):
        outs = model(x)
    for hook in hooks:
        hook.remove()
    g = torch.Generator().manual_seed(2)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)
                ).sum() for o in outs)
    wrt = [p for p in model.parameters() if p.requires_grad]
    return outs, torch.autograd.grad(loss, wrt), per_block


def expected_savings(name, autocast, block_maps, frozen_blocks):
    """Bytes each saving frees per block: (SiLU in the op, recompute, MLP).

    Per position of a block with C channels, ``d_inner`` E and MLP width M:
    the SiLU's output (E values in the map's dtype); for VMamba the norm's
    float32 output, SiLU(z) and out_proj's input, for VMamba2 out_proj's
    input (a float32 norm output, or its bfloat16 cast under autocast), with
    the norm's mean and 1 / std (2 float32) in both; under autocast also
    autocast's bfloat16 copy of out_proj's weight (C x E) per block. The
    MLP (VMamba2): the GELU's output (M values in the map's dtype) and under
    autocast autocast's bfloat16 copies of fc1's and fc2's weights
    (2 x C x M).
    """
    savings = []
    for index, (positions, channels, d_inner, hidden) in enumerate(
            block_maps):
        if index in frozen_blocks:
            savings.append((0, 0, 0))
            continue
        half = 2 if autocast else 4  # bytes of the map's dtype
        silu = positions * d_inner * half
        if name == 'VMamba':  # normed (float32), SiLU(z), the product
            per_position = d_inner * (4 + half + half) + 8
        else:  # the norm's output as out_proj reads it
            per_position = d_inner * half + 8
        weight = channels * d_inner * 2 if autocast else 0
        mlp = positions * hidden * half + (
            2 * channels * hidden * 2 if autocast else 0)
        savings.append((silu, positions * per_position + weight, mlp))
    return savings


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('case', [
    'VMamba-float32', 'VMamba-autocast', 'VMamba-autocast-frozen',
    'VMamba2-float32', 'VMamba2-autocast', 'VMamba2-autocast-frozen'
])
def test_fused_silu_and_recompute_saved_bytes_per_block(
        case, device, monkeypatch):
    # float32 means float32: no TensorFloat-32 in cuDNN's convolutions
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    name = case.split('-')[0]
    autocast = 'autocast' in case
    frozen = 'frozen' in case
    model_cls, arch, recompute_key, mlp_key = MODELS[name]
    variants = [v for v in VARIANTS if mlp_key or v != 'mlp']
    kwargs = dict(out_indices=(0, 1, 2, 3), drop_path_rate=0.2)
    if frozen:
        kwargs['frozen_stages'] = 1
    torch.manual_seed(0)
    models = {}  # by (recompute, mlp)
    for variant in variants:
        options = VARIANTS[variant][1:]
        if options not in models:
            switches = {recompute_key: options[0]}
            if mlp_key:
                switches[mlp_key] = options[1]
            models[options] = model_cls(arch, **kwargs, **switches)
    plain = models[(False, False)]
    for model in models.values():
        model.load_state_dict(plain.state_dict())
        model.to(device)
    frozen_blocks = set()
    if frozen:  # stage 0, and x_proj everywhere
        frozen_blocks = set(range(len(plain.stages[0].blocks)))
        for model in models.values():
            for block in blocks_of(model):
                block.ss2d.x_proj_weight.requires_grad_(False)
    # each block's input (B, H, W, C), d_inner and MLP width, per run
    shapes = []

    def record_shapes(block, args):
        mlp = getattr(block, 'mlp', None)  # VMamba's blocks have none
        shapes.append((args[0].shape, block.ss2d.d_inner,
                       0 if mlp is None else mlp.fc1.out_features))

    for block in blocks_of(plain):
        block.register_forward_pre_hook(record_shapes)
    x = torch.randn(2, 3, 45, 62).to(device)
    results = {}
    for variant in variants:
        silu_in_op, *options = VARIANTS[variant]
        with silu_before_the_op(not silu_in_op):
            results[variant] = run(models[tuple(options)].train(), x,
                                   autocast)

    outs, grads, _ = results['before']
    names = [f'output {i}' for i in range(len(outs))] + [
        f'grad of {n}' for n, p in plain.named_parameters() if p.requires_grad
    ]
    worst = (0.0, 'none')
    for variant in variants[1:]:
        outs_v, grads_v, _ = results[variant]
        assert len(grads_v) == len(grads)
        for tensor, a, b in zip(names, (*outs, *grads), (*outs_v, *grads_v)):
            assert a.dtype == b.dtype, variant
            if device == 'cpu':
                assert torch.equal(a, b), (variant, tensor)
                continue
            # the CUDA kernels sum y, du and dx_dbl by atomics, whose order
            # (so the last bits) changes from run to run, and the
            # recomputing functions' matrix products may round apart from
            # autograd's: each tensor within a share of its largest
            # magnitude. Largest measured on an H200 (2026-11-29): float32
            # 1.6e-6, held to 2e-5; under bfloat16 autocast, where such a
            # difference flips the rounding of bfloat16 values (2^-8 each)
            # and stage 3's out_proj gradient sums 8 positions, 1.3e-2,
            # held to 5e-2.
            difference = _scaled_difference(a, b)
            worst = max(worst, (difference, f'{variant}: {tensor}'))
            assert difference <= (5e-2 if autocast else 2e-5), (
                variant, tensor, difference)
    if device != 'cpu':
        print(f'{case} (cuda): largest difference over the largest '
              f'magnitude: {worst[0]:.2e} ({worst[1]})')

    shapes = shapes[:len(blocks_of(plain))]
    block_maps = [(shape[:3].numel(), shape[3], d_inner, hidden)
                  for shape, d_inner, hidden in shapes]
    savings = expected_savings(name, autocast, block_maps, frozen_blocks)
    rows = [f'{case} ({device}): bytes kept for the backward per block, '
            f'batch 2, {tuple(x.shape[2:])} input',
            f'{"block":>7} {"C":>4} {"map":>9} ' +
            ' '.join(f'{v:>11}' for v in variants) + f' {"saved":>8}']
    stage_of = [(i, s) for s, stage in enumerate(plain.stages)
                for i in range(len(stage.blocks))]
    for index, (silu, recompute, mlp) in enumerate(savings):
        kept = {v: results[v][2].get(index, 0) for v in variants}
        assert kept['before'] - kept['silu in op'] == silu
        assert kept['before'] - kept['recompute'] == recompute
        if mlp_key:
            assert kept['before'] - kept['mlp'] == mlp
        assert kept['before'] - kept['default'] == silu + recompute + mlp
        (_, H, W, channels), _, _ = shapes[index]
        rows.append(
            f'{"%d.%d" % (stage_of[index][1], stage_of[index][0]):>7} '
            f'{channels:>4} {"%dx%d" % (H, W):>9} ' +
            ' '.join(f'{kept[v]:>11,}' for v in variants) +
            (f' {1 - kept["default"] / kept["before"]:>8.1%}'
             if kept['before'] else f' {"-":>8}'))
    other = {v: results[v][2].get(None, 0) for v in variants}
    assert len(set(other.values())) == 1  # outside the blocks: the same
    totals = {v: sum(results[v][2].values()) for v in variants}
    rows.append(f'{"other":>7} {"":>4} {"":>9} ' +
                ' '.join(f'{other[v]:>11,}' for v in variants))
    rows.append(f'{"total":>7} {"":>4} {"":>9} ' +
                ' '.join(f'{totals[v]:>11,}' for v in variants) +
                f' {1 - totals["default"] / totals["before"]:>8.1%}')
    print('\n'.join(rows))


def test_recompute_is_the_default():
    assert VMamba(dict(embed_dims=8, depths=[1, 1, 1, 1])).stages[0].blocks[
        0].ss2d.recompute_gate
    block = VMamba2(dict(embed_dims=8, depths=[1, 1, 1, 1], ssm_ratio=1.0,
                         d_state=1, mlp_ratio=4.0)).stages[0].blocks[0]
    assert block.ss2d.recompute_norm and block.mlp.recompute
