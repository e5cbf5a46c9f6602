"""The VMamba backbone: layout, sizes, options, registries and errors."""
import re

import pytest
import torch
import torch.nn as nn

from mmvmamba.models import VMamba, VMamba2
from mmvmamba.models.backbones.common import ss2d_output
from mmvmamba.models.backbones.vmamba import SS2D
from mmvmamba.ops.backend import use_backend

SMALL = dict(embed_dims=16, depths=[1, 1, 2, 1])
# VMamba2's arch dict names its block settings too
SMALL2 = dict(SMALL, ssm_ratio=1.0, d_state=1, mlp_ratio=4.0)
ARCH_OF = {VMamba: SMALL, VMamba2: SMALL2}


class RandomProjection:
    """Loss of a tuple of outputs: their sum against random weights, drawn
    (float64) at the first call and kept. ``sum(o ** 2)`` of the outputs'
    LayerNorms would be nearly constant, its gradients rounding noise."""

    def __init__(self):
        self.weights = None

    def __call__(self, outs):
        if self.weights is None:
            self.weights = [
                torch.randn_like(o, dtype=torch.float64) for o in outs
            ]
        return sum((o * w.to(o.dtype)).sum()
                   for o, w in zip(outs, self.weights))


@pytest.mark.parametrize('arch,params', [('tiny', 22_893_448),
                                         ('small', 44_417_416),
                                         ('base', 76_254_056)])
def test_parameter_counts_match_the_paper(arch, params):
    model = VMamba(arch)
    width = model.num_features[-1]
    head = width * 1000 + 1000
    assert sum(p.numel() for p in model.parameters()) + head == params


def test_arch_aliases_and_dict():
    assert VMamba('t').num_features == [96, 192, 384, 768]
    assert VMamba('B').num_features == [128, 256, 512, 1024]
    model = VMamba(dict(embed_dims=32, depths=[1, 1, 1, 1], d_state=8,
                        ssm_ratio=1.0, dt_rank=3))
    ss2d = model.stages[0].blocks[0].ss2d
    assert ss2d.A_logs.shape == (4 * 32, 8)
    assert ss2d.dt_projs_weight.shape == (4, 32, 3)
    assert ss2d.x_proj_weight.shape == (4, 3 + 16, 32)


@pytest.mark.parametrize('size,expected', [
    ((64, 64), [(16, 16), (8, 8), (4, 4), (2, 2)]),
    ((100, 75), [(25, 19), (13, 10), (7, 5), (4, 3)]),
    ((33, 18), [(9, 5), (5, 3), (3, 2), (2, 1)]),
    ((4, 4), [(1, 1), (1, 1), (1, 1), (1, 1)]),
])
def test_output_shapes_any_size(size, expected):
    model = VMamba(SMALL, out_indices=(0, 1, 2, 3)).eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, *size))
    assert [o.shape[2:] for o in outs] == expected
    assert [o.shape[1] for o in outs] == [16, 32, 64, 128]
    assert all(o.is_contiguous() for o in outs)


def test_padding_is_zero_not_crop():
    """A size that is not a multiple of the patch (4) is zero-padded at the
    bottom and right: the outputs equal those of the input padded so by
    hand, at every stage (patch merging pads odd sizes alike); and the
    pixels of the last, partial patch count (no cropping)."""
    model = VMamba(SMALL, out_indices=(0, 1, 2, 3)).eval()
    x = torch.randn(2, 3, 10, 13)
    padded = torch.nn.functional.pad(x, (0, 3, 0, 2))  # to 12 x 16
    y = x.clone()
    y[..., 9, 12] += 1.0
    with torch.no_grad():
        outs, outs_padded, outs_y = model(x), model(padded), model(y)
    assert [o.shape[2:] for o in outs] == [(3, 4), (2, 2), (1, 1), (1, 1)]
    for a, b in zip(outs, outs_padded):
        assert torch.equal(a, b)
    assert not torch.allclose(outs[0][..., 2, 3], outs_y[0][..., 2, 3])


def test_layout_of_a_block():
    model = VMamba('tiny')
    keys = model.state_dict().keys()
    assert 'stages.0.blocks.1.ss2d.x_proj_weight' in keys
    assert 'stages.2.downsample.reduction.weight' in keys
    assert 'stages.3.downsample.norm.weight' not in keys
    ss2d = model.stages[0].blocks[0].ss2d
    assert ss2d.x_proj_weight.shape == (4, 6 + 32, 192)
    assert ss2d.dt_projs_weight.shape == (4, 192, 6)
    assert torch.equal(ss2d.A_logs[5],
                       torch.log(torch.arange(1., 17.)))
    assert torch.all(ss2d.Ds == 1)
    dt = torch.nn.functional.softplus(ss2d.dt_projs_bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6


def test_norms_train_on_triton_as_the_switch_says(monkeypatch):
    """VMamba's LayerNorms (every one but SS2D's out_norm, which is an
    nn.LayerNorm) take vmamba.NORMS_TRAIN_ON_TRITON when built."""
    from mmvmamba.models.backbones import vmamba
    from mmvmamba.ops import LayerNorm
    for on in (True, False):
        monkeypatch.setattr(vmamba, 'NORMS_TRAIN_ON_TRITON', on)
        model = VMamba(dict(embed_dims=16, depths=[1, 1]),
                       out_indices=(0, 1))
        norms = [m for m in model.modules() if isinstance(m, LayerNorm)]
        # patch embedding, 2 blocks, 1 merging, 2 outputs
        assert len(norms) == 6
        assert all(m.triton_when_recorded is on for m in norms)
        assert type(model.stages[0].blocks[0].ss2d.out_norm) is \
            torch.nn.LayerNorm


@pytest.mark.parametrize('frozen_stages', [-1, 0, 1, 2, 3])
def test_frozen_stages(frozen_stages):
    """The patch embedding (from 0 on) and stages ``< frozen_stages`` with
    their patch merging and output norms: eval mode, no gradients, not
    changed by a training step; the rest trains."""
    model = VMamba(SMALL, out_indices=(0, 1, 2, 3),
                   frozen_stages=frozen_stages)
    model.train()
    # the patch embedding, then each stage with its output norm
    parts = [torch.nn.Sequential(model.patch_embed)] + [
        torch.nn.Sequential(model.stages[i], getattr(model, f'norm{i}'))
        for i in range(4)
    ]
    frozen = parts[:frozen_stages + 1]
    before = [p.clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sum(o.sum() for o in model(torch.randn(1, 3, 32, 32))).backward()
    optimizer.step()
    for index, part in enumerate(parts):
        is_frozen = index < len(frozen)
        modules = list(part.modules())[1:]  # not the wrapping Sequential
        assert all(not m.training for m in modules) == is_frozen
        assert all(m.training for m in modules) != is_frozen
        for p in part.parameters():
            assert p.requires_grad != is_frozen
            assert (p.grad is None) == is_frozen
    changed = [not torch.equal(a, b)
               for a, b in zip(before, model.parameters())]
    frozen_ids = {id(p) for part in frozen for p in part.parameters()}
    for param, moved in zip(model.parameters(), changed):
        if id(param) in frozen_ids:
            assert not moved
    assert any(changed)
    # train() again (as the runner does each epoch) keeps them frozen
    model.train()
    assert all(not m.training for part in frozen
               for m in list(part.modules())[1:])
    everything = VMamba(SMALL, frozen_stages=4).train()
    assert not any(p.requires_grad for p in everything.parameters())


@pytest.mark.parametrize('norm_eval', [False, True])
def test_norm_eval(norm_eval):
    """norm_eval keeps BatchNorm layers (of subclasses; VMamba has none) in
    eval mode while training: running statistics unchanged."""

    class WithBN(VMamba):

        def __init__(self, **kwargs):
            super().__init__(SMALL, **kwargs)
            self.bn = torch.nn.BatchNorm2d(3)

        def forward(self, x):
            return super().forward(self.bn(x))

    model = WithBN(norm_eval=norm_eval).train()
    assert model.bn.training != norm_eval
    assert all(m.training for m in model.stages.modules())
    model(torch.randn(2, 3, 16, 16) + 5)
    moved = not torch.equal(model.bn.running_mean, torch.zeros(3))
    assert moved != norm_eval
    model.eval()
    assert not model.bn.training


def test_with_cp_gives_same_outputs_and_grads_and_saves_memory():
    """Gradient checkpointing with stochastic depth on: the same outputs and
    gradients (the recomputation redraws the same drop masks), and less
    kept for the backward."""
    torch.manual_seed(0)
    kwargs = dict(out_indices=(1, 3), drop_path_rate=0.5)
    plain = VMamba(SMALL, **kwargs).train()
    ckpt = VMamba(SMALL, with_cp=True, **kwargs).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 24, 20)
    results = []
    loss = RandomProjection()
    for model in (plain, ckpt):
        torch.manual_seed(1)  # the same drop masks
        outs, saved = saved_bytes(model, x)
        loss(outs).backward()
        results.append((outs, saved, [p.grad for p in model.parameters()]))
    (outs, saved, grads), (outs_cp, saved_cp, grads_cp) = results
    for a, b in zip([*outs, *grads], [*outs_cp, *grads_cp]):
        assert torch.equal(a, b)
    # kept: 105 KB with checkpointing against 724 KB without (measured on
    # the fused CPU scan, which keeps less than the unfused path's 1.35 MB)
    assert saved_cp < saved / 5
    with torch.no_grad():  # stochastic depth was on: eval differs
        assert not torch.equal(plain.eval()(x)[1], outs[1])


def test_drop_path_rates_are_linear():
    model = VMamba(dict(embed_dims=8, depths=[2, 2, 1, 1]),
                   drop_path_rate=0.5)
    rates = [b.drop_path.drop_prob for s in model.stages for b in s.blocks]
    assert rates == pytest.approx([0, 0.1, 0.2, 0.3, 0.4, 0.5])


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_drop_path_add_is_the_residual_sum_in_one_pass(dtype):
    """DropPath.add(residual, branch) is ``residual + drop_path(branch)``:
    the same per-sample masks for the same seed, the scale applied in
    float32 (a bfloat16 branch is not rounded after its scaling), in one
    addcmul; the residual's gradient passes through, the branch's is
    scaled. In eval (or at rate 0) it is the plain sum."""
    from mmvmamba.models.backbones.common import DropPath
    drop = DropPath(0.3).train()
    residual = torch.randn(6, 5, 7, 8, requires_grad=True)
    branch = torch.randn(6, 5, 7, 8, dtype=dtype, requires_grad=True)
    torch.manual_seed(3)
    out = drop.add(residual, branch)
    torch.manual_seed(3)
    kept = drop(torch.ones(6, 1, 1, 1)) * 0.7  # the masks, 0 or 1
    assert kept.unique().tolist() in ([0., 1.], [1.], [0.])
    scale = kept.double() / 0.7
    expected = residual.double() + branch.double() * scale
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(out)
    d_residual, d_branch = torch.autograd.grad(out, (residual, branch), grad)
    assert torch.equal(d_residual, grad)
    torch.testing.assert_close(d_branch, (grad.double() * scale).to(dtype))
    drop.eval()
    assert torch.equal(drop.add(residual, branch), residual + branch)


def test_negative_out_indices_count_from_the_last_stage():
    model = VMamba(dict(embed_dims=8, depths=[1, 1, 1, 1]),
                   out_indices=(-4, -1))
    assert model.out_indices == (0, 3)
    outs = model(torch.randn(1, 3, 32, 32))
    assert [tuple(o.shape) for o in outs] == [(1, 8, 8, 8), (1, 64, 1, 1)]


@pytest.mark.parametrize('kwargs,match', [
    (dict(arch='huge'), r'arch must be one of'),
    (dict(arch=dict(embed_dims=8)), r'missing \[\'depths\'\]'),
    (dict(arch=dict(embed_dims=8, depths=[1], width=3)), r'unknown'),
    (dict(out_indices=(4, )), r'out_indices must lie in \[0, 4\)'),
    (dict(out_indices=(-5, )),
     r'out_indices must lie in \[0, 4\) \(or \[-4, 0\) from the end\), '
     r'got -5'),
    (dict(out_indices=(3, -1)),
     r'out_indices must name each stage once .*, got \(3, -1\)'),
    (dict(out_indices=()), r'out_indices must be a stage index or a '
     r'non-empty sequence of them, got \[\]'),
    (dict(out_indices=3.0), r'out_indices must be .*, got 3.0'),
    (dict(out_indices=(1, '3')), r"out_indices must be .*, got \[1, '3'\]"),
    (dict(frozen_stages=5), r'frozen_stages must be an int in \[-1, 4\]'),
    (dict(frozen_stages='2'), r"frozen_stages must be an int .*, got '2'"),
    (dict(arch=dict(embed_dims=0, depths=[1])),
     r"arch\['embed_dims'\] must be a positive int, got 0"),
    (dict(arch=dict(embed_dims=8, depths=[2, -1])),
     r"arch\['depths'\] must be a non-empty list of positive ints"),
    (dict(arch=dict(embed_dims=8, depths=[])), r"arch\['depths'\]"),
    (dict(arch=dict(embed_dims=8, depths=[1], d_state=0)),
     r"arch\['d_state'\] must be a positive int, got 0"),
    (dict(arch=dict(embed_dims=8, depths=[1], ssm_ratio=0.1)),
     r"arch\['ssm_ratio'\] must be a number giving at least one inner "
     r'channel \(int\(ssm_ratio \* 8\) >= 1\), got 0.1'),
    # were int()'s ValueError and OverflowError
    (dict(arch=dict(embed_dims=8, depths=[1], ssm_ratio=float('nan'))),
     r"arch\['ssm_ratio'\] must be a number giving .*, got nan"),
    (dict(arch=dict(embed_dims=8, depths=[1], ssm_ratio=float('inf'))),
     r"arch\['ssm_ratio'\] must be a number giving .*, got inf"),
    (dict(arch=dict(embed_dims=8, depths=[1], dt_rank=0)),
     r"arch\['dt_rank'\] must be 'auto' or a positive int, got 0"),
    (dict(in_channels=0), r'in_channels must be a positive int, got 0'),
    (dict(drop_path_rate=1.0), r'drop_path_rate must be a number in '
     r'\[0, 1\), got 1.0'),
    (dict(drop_path_rate=-0.1), r'drop_path_rate must be a number in'),
    (dict(with_cp='yes'), r"with_cp must be a bool, got 'yes'"),
    (dict(norm_eval=1), r'norm_eval must be a bool, got 1'),
    (dict(recompute_gate='no'), r"recompute_gate must be a bool, got 'no'"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VMamba(**kwargs)


@pytest.mark.parametrize('backbone', [VMamba, VMamba2])
@pytest.mark.parametrize('shape', [(1, 3, 0, 8), (2, 3, 8, 0), (0, 3, 0, 0)])
def test_images_of_no_pixels_are_refused(backbone, shape):
    model = backbone(ARCH_OF[backbone])
    with pytest.raises(ValueError, match=r'x must have images of at least '
                       r'one pixel \(H, W >= 1\), got shape '
                       + re.escape(str(shape))):
        model(torch.zeros(shape))


def test_bad_input():
    model = VMamba(SMALL)
    with pytest.raises(ValueError, match=r'x must have shape \(batch, '
                       r'in_channels, H, W\) = \(\*, 3, \*, \*\), got '
                       r'\(1, 4, 8, 8\)'):
        model(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match='x must have shape'):
        model(torch.randn(3, 8, 8))
    # an image batch as read from disk, not yet normalised
    with pytest.raises(ValueError, match=r'x must have dtype in \(float32, '
                       r'float16, bfloat16, float64\), got uint8'):
        model(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


@pytest.mark.parametrize('backbone', [VMamba, VMamba2])
def test_input_against_the_weights(backbone):
    """A dtype or device other than the weights' is named, not left to the
    first convolution; under autocast any float dtype is taken."""
    model = backbone(ARCH_OF[backbone]).eval()
    with pytest.raises(ValueError, match="x has dtype float64 but the "
                       "backbone's weights float32: cast one to the other"):
        model(torch.randn(1, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="x is on meta but the backbone's "
                       "weights are on cpu"):
        model(torch.randn(1, 3, 8, 8, device='meta'))
    with torch.autocast('cpu', torch.bfloat16):
        outs = model(torch.randn(1, 3, 8, 8, dtype=torch.bfloat16))
    assert outs[0].shape == (1, 16 * 8, 1, 1)


@pytest.mark.parametrize('device', [
    'cpu', pytest.param('cuda', marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason='needs a GPU'))])
@pytest.mark.parametrize('backbone', [VMamba, VMamba2])
def test_empty_batch(backbone, device):
    """A batch of no images: outputs of the right shapes, no images, and
    zero gradients (as PyTorch's own layers give)."""
    model = backbone(ARCH_OF[backbone], out_indices=(0, 1, 2, 3)).to(device)
    x = torch.randn(0, 3, 37, 50, device=device, requires_grad=True)
    outs = model(x)
    assert [o.shape for o in outs] == [
        (0, 16 * 2**i, h, w)
        for i, (h, w) in enumerate([(10, 13), (5, 7), (3, 4), (2, 2)])]
    sum(o.sum() for o in outs).backward()
    assert x.grad.shape == x.shape
    assert all(not p.grad.any() for p in model.parameters()
               if p.grad is not None)


def test_scan_dtype_option():
    torch.manual_seed(0)
    model = VMamba(SMALL, out_indices=(0, 3), drop_path_rate=0.)
    low = VMamba(SMALL, out_indices=(0, 3), drop_path_rate=0.,
                 scan_dtype='bfloat16')
    low.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 40, 48)
    # measured (CPU kernel): 1.1e-5 at stage 0, 3.6e-4 at stage 3
    for a, b, bound in zip(model(x), low(x), (1e-4, 4e-3)):
        err = ((a - b).norm() / a.norm()).item()
        assert 0 < err < bound
    with pytest.raises(ValueError, match='scan_dtype must be one of'):
        VMamba(SMALL, scan_dtype='float16')


def saved_bytes(model, x):
    """model(x) and the bytes of the distinct storages autograd keeps for its
    backward, parameters aside."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return out, sum(storages.values())


def test_recompute_gate_same_results_less_memory():
    torch.manual_seed(0)
    plain = VMamba(SMALL, out_indices=(0, 3), drop_path_rate=0.,
                   recompute_gate=False)
    lean = VMamba(SMALL, out_indices=(0, 3), drop_path_rate=0.)
    assert all(m.recompute_gate for m in lean.modules()
               if isinstance(m, SS2D))  # the default
    lean.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 40, 52)
    maps = []  # the gate's inputs: (B, H, W, d_inner) maps, one per block
    for module in plain.modules():
        if isinstance(module, SS2D):
            module.register_forward_hook(
                lambda m, args, out: maps.append(out.shape[:3] +
                                                 (m.d_inner, )))
    results = []
    loss = RandomProjection()
    for model in (plain, lean):
        outs, saved = saved_bytes(model, x)
        loss(outs).backward()
        results.append((outs, saved, [p.grad for p in model.parameters()]))
    (outs, saved, grads), (outs_lean, saved_lean, grads_lean) = results
    for a, b in zip([*outs, *grads], [*outs_lean, *grads_lean]):
        assert torch.equal(a, b)
    # not kept (float32): the norm's output, SiLU(z), their product
    # (out_proj's input) and the norm's mean and 1 / std per position
    gate_bytes = sum(torch.Size(shape[:3]).numel() * (3 * 4 * shape[3] + 8)
                     for shape in maps)
    assert len(maps) == 5 and saved - saved_lean == gate_bytes
    with torch.no_grad():  # nothing to recompute for
        for a, b in zip(plain(x), lean(x)):
            assert torch.equal(a, b)


@pytest.mark.parametrize('case', [
    'float32', 'autocast', 'half-autocast', 'frozen-norm', 'frozen-proj',
    'frozen-input', 'bias', 'bias-autocast', 'no-gate', 'no-gate-autocast',
    'compiled', 'compiled-autocast'
])
def test_recomputed_output_equals_the_plain_graph_bitwise(case):
    """out_proj(out_norm(y) * SiLU(z)) by RecomputedOutput and by autograd:
    the same output and gradients, bit for bit, in their dtypes."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if case == 'half-autocast' else torch.float32
    autocast = 'autocast' in case
    y = torch.randn(2, 5, 7, 24, dtype=dtype)
    z = None if 'no-gate' in case else torch.randn(2, 5, 7, 24, dtype=dtype)
    norm = torch.nn.LayerNorm(24).to(dtype)
    proj = torch.nn.Linear(24, 10, bias='bias' in case).to(dtype)
    for param in (*norm.parameters(), *proj.parameters()):
        torch.nn.init.normal_(param)
    norm.requires_grad_(case != 'frozen-norm')
    proj.requires_grad_(case != 'frozen-proj')
    grad = torch.randn(2, 5, 7, 10)

    def plain(y, z):
        return ss2d_output(y, z, norm, proj, recompute=False)

    def lean(y, z):
        return ss2d_output(y, z, norm, proj, recompute=True)

    if 'compiled' in case:
        torch._dynamo.reset()
        lean = torch.compile(lean, fullgraph=True, backend='aot_eager')
    results = []
    for output in (plain, lean):
        inputs = [t if t is None else
                  t.clone().requires_grad_(case != 'frozen-input')
                  for t in (y, z)]
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            if autocast and z is not None:  # z as a linear layer's output
                inputs[1] = inputs[1].to(torch.bfloat16)
            out = output(*inputs)
        wrt = [t for t in (*inputs, *norm.parameters(), *proj.parameters())
               if t is not None and t.requires_grad]
        results.append((out, torch.autograd.grad(out, wrt,
                                                 grad.to(out.dtype))))
    (out, grads), (out_lean, grads_lean) = results
    expected = {'frozen-norm': 3, 'frozen-proj': 4, 'frozen-input': 3,
                'bias': 6, 'bias-autocast': 6, 'no-gate': 4,
                'no-gate-autocast': 4}.get(case, 5)
    assert len(grads) == len(grads_lean) == expected
    for a, b in zip((out, *grads), (out_lean, *grads_lean)):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize('recompute_gate', [False, True])
def test_torch_compile_fullgraph_matches_eager(recompute_gate):
    """Outputs and parameter gradients (the fused scan's and the
    recomputing Functions' backwards traced too)."""
    torch._dynamo.reset()
    model = VMamba(SMALL, out_indices=(0, 1, 2, 3), drop_path_rate=0.,
                   recompute_gate=recompute_gate)
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    x = torch.randn(2, 3, 37, 53)
    loss = RandomProjection()
    results = []
    for run in (model, compiled):
        outs = run(x)
        results.append((outs, torch.autograd.grad(loss(outs),
                                                  list(model.parameters()))))
    for a, b in zip([*results[0][0], *results[0][1]],
                    [*results[1][0], *results[1][1]]):
        torch.testing.assert_close(b, a)


def test_kernel_model_matches_float64_reference():
    """The whole model on the compiled scan against float64 on the reference
    (values, and gradients of a :class:`RandomProjection` of the outputs)."""
    torch.manual_seed(0)
    model = VMamba(SMALL, out_indices=(0, 1, 2, 3), drop_path_rate=0.)
    x = torch.randn(2, 3, 37, 53)
    loss = RandomProjection()

    def run(model, x):
        outs = model(x)
        return outs, torch.autograd.grad(loss(outs), list(model.parameters()))

    outs, grads = run(model, x)
    with use_backend('reference'):
        ref_outs, ref_grads = run(model.double(), x.double())
    for a, b in zip(outs + grads, ref_outs + ref_grads):
        err = ((a.double() - b).norm() / b.norm()).item()
        assert err < 1e-5  # measured: at most 1.0e-6


class _SubclassedLinear(nn.Linear):
    """A subclass may change the forward: SS2D keeps the whole product."""


@pytest.mark.parametrize('variant', ['plain', 'bias', 'hooked', 'subclass'])
def test_split_in_proj_matches_the_whole_product(monkeypatch, variant):
    """vmamba.SPLIT_IN_PROJ: where autograd records, in_proj runs as two
    products (with a bias too) and the conv gets a dense x; the output and
    every gradient are those of the whole product. A forward hook on
    in_proj or a subclass of nn.Linear keeps the whole product."""
    from mmvmamba.models.backbones import vmamba
    torch.manual_seed(0)
    ss2d = SS2D(8, d_state=4)
    if variant in ('bias', 'subclass'):
        proj = (nn.Linear if variant == 'bias' else _SubclassedLinear)(
            8, ss2d.in_proj.out_features, bias=variant == 'bias')
        ss2d.in_proj = proj
    calls = []
    if variant == 'hooked':
        ss2d.in_proj.register_forward_hook(lambda *_: calls.append('hook'))
    dense = []
    conv = vmamba.depthwise_conv_nhwc
    monkeypatch.setattr(
        vmamba, 'depthwise_conv_nhwc',
        lambda module, x, **kw: dense.append(x.is_contiguous()) or conv(
            module, x, **kw))
    x = torch.randn(2, 5, 7, 8, requires_grad=True)
    grad = torch.randn(2, 5, 7, 8)
    results = []
    for split in (False, True):
        monkeypatch.setattr(vmamba, 'SPLIT_IN_PROJ', split)
        out = ss2d(x)
        wrt = (x, *ss2d.parameters())
        results.append((out, *torch.autograd.grad(out, wrt, grad)))
    splits = variant in ('plain', 'bias')
    assert dense == [False, splits]
    assert calls == (['hook', 'hook'] if variant == 'hooked' else [])
    for whole, split in zip(*results):
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # nothing recorded: the whole product
        ss2d(x)
    assert dense[-1] is False


class _SubclassedConv(nn.Conv2d):
    """A subclass may change the forward: PatchEmbed calls the module."""


@pytest.mark.parametrize('variant',
                         ['plain', 'odd size', 'hooked', 'subclass',
                          'overlapping'])
def test_patch_embed_product_matches_the_conv(variant):
    """PatchEmbed runs its stride-4 conv as the product of the flattened
    patches with the conv's weight: output (channels-last, contiguous) and
    the gradients of the weight, bias and input are the conv's. A forward
    hook on proj, a subclass of nn.Conv2d or a conv that is not one output
    a patch (here overlapping windows) is called as the module."""
    from mmvmamba.models.backbones.vmamba import PatchEmbed
    torch.manual_seed(0)
    embed = PatchEmbed(3, 8)
    if variant == 'subclass':
        embed.proj = _SubclassedConv(3, 8, 4, stride=4)
    elif variant == 'overlapping':
        embed.proj = nn.Conv2d(3, 8, 4, stride=2)
    calls = []
    if variant == 'hooked':
        embed.proj.register_forward_hook(lambda *_: calls.append('hook'))
    forward = embed.proj.forward
    embed.proj.forward = lambda t: calls.append('forward') or forward(t)
    size = (10, 13) if variant == 'odd size' else (16, 12)
    x = torch.randn(2, 3, *size, requires_grad=True)
    out = embed(x)
    padded = torch.nn.functional.pad(x, (0, -size[1] % 4, 0, -size[0] % 4))
    expected = embed.norm(embed.proj._conv_forward(
        padded, embed.proj.weight, embed.proj.bias).permute(0, 2, 3, 1))
    assert out.shape == expected.shape
    assert calls == {'plain': [], 'odd size': [], 'hooked': ['forward', 'hook']
                     }.get(variant, ['forward'])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out)
    wrt = (x, embed.proj.weight, embed.proj.bias)
    for got, want in zip(torch.autograd.grad(out, wrt, grad),
                         torch.autograd.grad(expected, wrt, grad)):
        # float32 sums in another order (measured: at most 3.4e-6)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize('variant', ['plain', 'hooked', 'subclass'])
def test_ss2d_conv_bias_apart_matches_the_module(monkeypatch, variant):
    """SS2D hands its depthwise conv to ``depthwise_conv_nhwc`` with
    ``module_call=False`` (the bias added apart, its gradient a product with
    ones) unless calling the module would run more: a forward hook on it,
    or a subclass of nn.Conv2d. Outputs and every gradient are the module
    call's."""
    from mmvmamba.models.backbones import vmamba
    torch.manual_seed(0)
    ss2d = SS2D(8, d_state=4)
    if variant == 'subclass':
        old = ss2d.conv2d
        ss2d.conv2d = _SubclassedConv(old.in_channels, old.out_channels,
                                      old.kernel_size, padding=old.padding,
                                      groups=old.groups)
    calls = []
    if variant == 'hooked':
        ss2d.conv2d.register_forward_hook(lambda *_: calls.append('hook'))
    conv = vmamba.depthwise_conv_nhwc
    module_calls = []

    def spy(module, x, module_call=True, **kw):
        module_calls.append(module_call)
        return conv(module, x, module_call=module_call or forced, **kw)

    monkeypatch.setattr(vmamba, 'depthwise_conv_nhwc', spy)
    x = torch.randn(2, 5, 7, 8, requires_grad=True)
    grad = torch.randn(2, 5, 7, 8)
    results = []
    for forced in (True, False):
        out = ss2d(x)
        wrt = (x, *ss2d.parameters())
        results.append((out, *torch.autograd.grad(out, wrt, grad)))
    assert module_calls == [variant != 'plain'] * 2
    assert calls == (['hook', 'hook'] if variant == 'hooked' else [])
    for module, apart in zip(*results):
        torch.testing.assert_close(apart, module, rtol=1e-5, atol=1e-6)
