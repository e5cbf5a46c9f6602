"""The fused four-direction scan on the CPU (``cross_scan_fwd`` / ``_bwd``).

Every case draws fresh random inputs, runs SS2D's core on the fused CPU
kernels and compares its output and every gradient with the unfused path in
float64 on the PyTorch reference. Skipped when ``mmvmamba._C`` has no CPU
kernel of the op (pure-Python install).
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch

from mmvmamba.models import VMamba
from mmvmamba.ops import _ext, cross_selective_scan
from mmvmamba.ops.backend import RecordScans

cross_scan = importlib.import_module('mmvmamba.ops.cross_scan')

pytestmark = pytest.mark.skipif(
    not _ext.has_cross_kernel('cpu'),
    reason='needs mmvmamba._C with the fused CPU kernel')

# (batch, D, H, W, R, N): odd and non-square maps, D not a multiple of the
# 4, 8 or 16 channels of a vector, N from 1 to 16 (padded to 1, 2, 4, 8,
# 16), ranks 1 to 48.
CASES = [
    (1, 24, 5, 7, 3, 16),
    (3, 19, 1, 6, 5, 3),  # H = 1, three batch entries
    (1, 40, 6, 1, 48, 16),  # W = 1, VMamba-T stage-3 rank
    (2, 8, 1, 1, 1, 1),  # L = 1, N = 1, R = 1
    (1, 33, 11, 30, 48, 16),
    (3, 17, 4, 9, 2, 8),
    (1, 100, 3, 5, 12, 2),
    (2, 96, 14, 13, 6, 16),  # VMamba-T stage-0 width
    (1, 24, 40, 37, 4, 16),  # L = 1480: a biased exp would add up
]
# Relative errors against float64, measured over these cases: output at
# most 3e-7 (an exp with 1 + 1.2e-7 at 0 gave 1.2e-6 at L = 330, more on
# longer maps); gradients at most 8e-7.
TOLERANCE = 1e-6
GRAD_TOLERANCE = 4e-6
NAMES = ('x', 'x_proj_weight', 'dt_projs_weight', 'dt_projs_bias', 'A_logs',
         'Ds')


def make_params(case, seed=None):
    """A channels-last map and SS2D parameters as the authors initialise
    them, float32."""
    batch, d_inner, H, W, rank, d_state = case
    g = torch.Generator().manual_seed(
        torch.seed() % 2**31 if seed is None else seed)
    params = dict(
        x_proj_weight=torch.randn(4, rank + 2 * d_state, d_inner,
                                  generator=g) * d_inner**-0.5,
        dt_projs_weight=(torch.rand(4, d_inner, rank, generator=g) * 2 - 1) *
        rank**-0.5,
        dt_projs_bias=torch.rand(4, d_inner, generator=g) * 4 - 5,
        A_logs=torch.log(torch.rand(4 * d_inner, d_state, generator=g) * 8 +
                         0.5),
        Ds=torch.randn(4 * d_inner, generator=g))
    return torch.randn(batch, H, W, d_inner, generator=g), params


def run(x, params, fused, dtype=None):
    """Output and the gradients of x and every parameter for a fixed random
    output gradient; ``dtype`` casts x and the parameters first."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_()
              for t in (x, *params.values())]
    y = cross_selective_scan(*leaves, channels_last=True, fused=fused)
    g = torch.Generator().manual_seed(0)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    grads = torch.autograd.grad((y * dy).sum(), leaves)
    return y.detach(), dict(zip(NAMES, grads))


def reference(x, params):
    """The unfused path in float64 (PyTorch reference scan)."""
    return run(x, params, fused=False, dtype=torch.float64)


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() /
            ref.double().norm().clamp_min(1e-30)).item()


def op_args(x, params):
    """Arguments of ``cross_scan_fwd`` for a channels-last map."""
    batch, H, W, d_inner = x.shape
    u = x.reshape(batch, H * W, d_inner)
    x_dbl = torch.einsum('bld,kcd->blkc', u, params['x_proj_weight'])
    return (u, x_dbl, params['dt_projs_weight'], params['dt_projs_bias'],
            -torch.exp(params['A_logs']), params['Ds'], H, W)


def errors(case, seed=None):
    """Relative errors of the fused output and gradients against float64."""
    x, params = make_params(case, seed)
    y, grads = run(x, params, fused=True)
    y_ref, grads_ref = reference(x, params)
    assert y.dtype == torch.float32 and y.shape == x.shape
    return rel_err(y, y_ref), {
        name: rel_err(grads[name], grads_ref[name])
        for name in NAMES
    }


@pytest.mark.parametrize('case', CASES)
def test_fused_cpu_matches_float64_reference(case):
    out_err, grad_errs = errors(case)
    assert out_err < TOLERANCE
    for name, err in grad_errs.items():
        assert err < GRAD_TOLERANCE, (name, err)


ISA_SCRIPT = """
import sys
sys.path.insert(0, {here!r})
from test_cross_scan_cpu import CASES, errors
for case in (CASES[0], CASES[1], CASES[4]):
    out_err, grad_errs = errors(case, seed=1)
    print(out_err, max(grad_errs.values()))
"""


@pytest.mark.parametrize('isa', ['avx2', 'generic'])
def test_narrower_instruction_sets_match_float64_reference(isa):
    """The kernels built for AVX2 and for the baseline instruction set (the
    widest the processor has runs by default), picked by MMVMAMBA_CPU_ISA in
    a fresh process."""
    script = ISA_SCRIPT.format(here=os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MMVMAMBA_CPU_ISA=isa)
    out = subprocess.run([sys.executable, '-c', script], env=env, text=True,
                         capture_output=True, check=True).stdout
    rows = [[float(v) for v in line.split()] for line in out.splitlines()]
    assert len(rows) == 3, out
    assert max(r[0] for r in rows) < TOLERANCE, rows
    assert max(r[1] for r in rows) < GRAD_TOLERANCE, rows


def test_unknown_instruction_set_raises():
    script = ('import torch, mmvmamba.ops._ext\n'
              'torch.ops.mmvmamba.cross_scan_fwd(torch.zeros(1, 1, 1), '
              'torch.zeros(1, 1, 4, 3), torch.zeros(4, 1, 1), '
              'torch.zeros(4, 1), torch.zeros(4, 1), torch.zeros(4), 1, 1)')
    env = dict(os.environ, MMVMAMBA_CPU_ISA='sse9')
    result = subprocess.run([sys.executable, '-c', script], env=env,
                            text=True, capture_output=True)
    assert result.returncode != 0
    assert ("MMVMAMBA_CPU_ISA must be auto, avx512, avx2 or generic, "
            "got 'sse9'") in result.stderr


def test_default_takes_the_fused_path(monkeypatch):
    """The fused kernel runs by default, with and without gradients, and
    agrees with the unfused float32 path."""
    x, params = make_params(CASES[0])
    calls = []
    fused_path = cross_scan._cross_selective_scan_fused
    monkeypatch.setattr(
        cross_scan, '_cross_selective_scan_fused',
        lambda *args: calls.append('fused') or fused_path(*args))
    with torch.no_grad():
        y_infer = cross_selective_scan(x, **params, channels_last=True)
    y_train, grads = run(x, params, fused=None)
    assert calls == ['fused', 'fused']
    assert torch.equal(y_train, y_infer)
    y_plain, grads_plain = run(x, params, fused=False)
    assert calls == ['fused', 'fused']
    assert rel_err(y_train, y_plain) < 1e-5
    for name in NAMES:
        assert rel_err(grads[name], grads_plain[name]) < 1e-4, name


def test_channels_first_layout():
    x, params = make_params(CASES[5])
    with torch.no_grad():
        y_last = cross_selective_scan(x, **params, channels_last=True)
        y_first = cross_selective_scan(x.permute(0, 3, 1, 2), **params)
    torch.testing.assert_close(y_first, y_last.permute(0, 3, 1, 2))


def test_non_contiguous_inputs():
    x, params = make_params(CASES[4])
    args = op_args(x, params)
    y, checkpoints = torch.ops.mmvmamba.cross_scan_fwd(*args)
    assert checkpoints.shape == (0, )
    u, x_dbl = args[:2]
    strided = (u.transpose(1, 2).contiguous().transpose(1, 2),
               x_dbl.permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0))
    assert not strided[0].is_contiguous()
    assert not strided[1].is_contiguous()
    y_strided, _ = torch.ops.mmvmamba.cross_scan_fwd(*strided, *args[2:])
    assert torch.equal(y_strided, y)
    dy = torch.randn_like(y)
    grads = torch.ops.mmvmamba.cross_scan_bwd(dy, *args, checkpoints)
    grads_strided = torch.ops.mmvmamba.cross_scan_bwd(
        dy.transpose(1, 2).contiguous().transpose(1, 2), *strided, *args[2:],
        checkpoints)
    for a, b in zip(grads, grads_strided):
        assert torch.equal(a, b)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=str)
def test_half_inputs_read_as_their_float32_upcast(dtype):
    """The kernels compute in float32 from half-precision u and x_dbl: the
    output is that of their exact upcast, bit for bit, and the gradients
    that of the upcast rounded to u's dtype."""
    for case in (CASES[0], CASES[1], CASES[6]):
        x, params = make_params(case)
        u, x_dbl, *rest = op_args(x, params)
        u16, x_dbl16 = u.to(dtype), x_dbl.to(dtype)

        def fwd_bwd(u, x_dbl):
            u = u.detach().requires_grad_()
            x_dbl = x_dbl.detach().requires_grad_()
            y = _ext.cross_scan_kernel(u, x_dbl, *rest)
            g = torch.Generator().manual_seed(1)
            du, dx = torch.autograd.grad(
                y, [u, x_dbl], torch.randn(y.shape, generator=g))
            return y, du, dx

        y16, du16, dx16 = fwd_bwd(u16, x_dbl16)
        y32, du32, dx32 = fwd_bwd(u16.float(), x_dbl16.float())
        assert y16.dtype == torch.float32
        assert du16.dtype == dx16.dtype == dtype
        assert torch.equal(y16, y32), case
        assert torch.equal(du16, du32.to(dtype)), case
        assert torch.equal(dx16, dx32.to(dtype)), case
    with RecordScans() as scans, torch.no_grad():
        y = cross_selective_scan(x, **params, channels_last=True,
                                 scan_dtype=dtype)
    assert scans.ran == ['fused-cpu']
    err = rel_err(y, reference(x, params)[0])
    assert 0 < err < 3e-2  # rounded inputs, float32 state


def test_zero_batch():
    x, params = make_params((0, 8, 3, 4, 2, 4))
    args = op_args(x, params)
    y, checkpoints = torch.ops.mmvmamba.cross_scan_fwd(*args)
    assert y.shape == (0, 12, 8) and checkpoints.shape == (0, )
    grads = torch.ops.mmvmamba.cross_scan_bwd(y, *args, checkpoints)
    assert [tuple(g.shape) for g in grads] == [
        (0, 12, 8), (0, 12, 4, 10), (4, 8, 2), (4, 8), (32, 4), (32, )
    ]
    assert all(not g.any() for g in grads)


def test_opcheck():
    x, params = make_params(CASES[1])
    args = op_args(x, params)
    torch.library.opcheck(torch.ops.mmvmamba.cross_scan_fwd.default, args)
    y, checkpoints = torch.ops.mmvmamba.cross_scan_fwd(*args)
    torch.library.opcheck(torch.ops.mmvmamba.cross_scan_bwd.default,
                          (torch.randn_like(y), *args, checkpoints))


def test_bad_inputs_raise_clear_errors():
    x, params = make_params(CASES[0])
    u, x_dbl, *rest = op_args(x, params)
    H, W = rest[-2:]
    fwd = torch.ops.mmvmamba.cross_scan_fwd
    with pytest.raises(RuntimeError, match='height x width'):
        fwd(u, x_dbl, *rest[:4], H + 1, W)
    with pytest.raises(RuntimeError, match='x_dbl must be'):
        fwd(u, x_dbl[..., :-1], *rest)
    with pytest.raises(RuntimeError,
                       match='u must be float32, float16 or bfloat16'):
        fwd(u.double(), x_dbl.double(), *rest)
    with pytest.raises(RuntimeError, match='x_dbl must be a Float tensor'):
        fwd(u, x_dbl.bfloat16(), *rest)
    with pytest.raises(RuntimeError, match='dt_bias must have shape'):
        fwd(u, x_dbl, rest[0], rest[1][:, :-1], *rest[2:])
    with pytest.raises(RuntimeError, match='covers 1 <= N <= 16'):
        A = torch.zeros(rest[2].shape[0], 17)
        fwd(u, torch.zeros(*x_dbl.shape[:3], 3 + 34), rest[0], rest[1], A,
            *rest[3:])
    y, checkpoints = fwd(u, x_dbl, *rest)
    bwd = torch.ops.mmvmamba.cross_scan_bwd
    with pytest.raises(RuntimeError, match='grad_out must be float32'):
        bwd(y.double(), u, x_dbl, *rest, checkpoints)
    with pytest.raises(RuntimeError, match="takes the forward's empty "
                       'checkpoints, got shape \\(3,\\)'):
        bwd(y, u, x_dbl, *rest, torch.zeros(3))


@pytest.mark.parametrize('rank,d_state', [(0, 4), (2, 0)])
def test_no_rank_or_state_takes_the_unfused_path(rank, d_state):
    """R = 0 or N = 0, which the fused kernel refuses, run unfused (were
    the kernel's RuntimeError under the default fused=None)."""
    x = torch.randn(2, 8, 3, 5)
    params = (torch.randn(4, rank + 2 * d_state, 8), torch.randn(4, 8, rank),
              torch.randn(4, 8), torch.randn(32, d_state), torch.randn(32))
    with RecordScans() as scans:
        y = cross_selective_scan(x, *params)
    assert not any(key.startswith('fused') for key in scans.ran)
    assert torch.equal(y, cross_selective_scan(x, *params, fused=False))
    with pytest.raises(ValueError, match=r'fused=True, but the fused kernel '
                       r'cannot run: (d_state N|dt_rank R)=0 < 1'):
        cross_selective_scan(x, *params, fused=True)


@pytest.mark.parametrize('size', [(64, 64), (70, 45)])
def test_backbone_fused_on_and_off_agree(size, monkeypatch):
    """VMamba's outputs and parameter gradients on the fused CPU kernels
    equal those of the unfused path."""
    torch.manual_seed(0)
    model = VMamba(dict(embed_dims=24, depths=[1, 2, 1, 1]),
                   out_indices=(0, 1, 2, 3), drop_path_rate=0.)
    x = torch.randn(2, 3, *size)
    weights = [None]

    def outputs_and_grads():
        outs = model(x)
        if weights[0] is None:
            weights[0] = [torch.randn_like(o) for o in outs]
        loss = sum((o * w).sum() for o, w in zip(outs, weights[0]))
        return outs, torch.autograd.grad(loss, list(model.parameters()))

    fused_outs, fused_grads = outputs_and_grads()
    monkeypatch.setattr(cross_scan, 'fused_unsupported_reason',
                        lambda *args: 'turned off by the test')
    plain_outs, plain_grads = outputs_and_grads()
    for a, b in zip(fused_outs, plain_outs):
        assert rel_err(a.detach(), b.detach()) < 1e-5
    for a, b in zip(fused_grads, plain_grads):
        assert rel_err(a, b) < 1e-4


def saved_storage_bytes(fn):
    """fn() and the bytes of the distinct storages autograd keeps for its
    backward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage(
        ).nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


# mode -> (map dtype, dtype of the projections' weights (the other
# parameters are float32), scan dtype, autocast, frozen)
SILU_MODES = {
    'float32': (torch.float32, torch.float32, None, False, ()),
    'autocast': (torch.bfloat16, torch.float32, None, True, ()),
    'autocast-bf16-scan': (torch.bfloat16, torch.float32, torch.bfloat16,
                           True, ()),
    'bf16-model': (torch.bfloat16, torch.bfloat16, None, False, ()),
    'fp16-map': (torch.float16, torch.float32, None, False, ()),
    'bf16-scan': (torch.float32, torch.float32, torch.bfloat16, False, ()),
    'frozen-x-proj': (torch.float32, torch.float32, None, False,
                      ('x_proj_weight', )),
    'frozen-scan-params': (torch.bfloat16, torch.float32, None, True,
                           ('dt_projs_weight', 'dt_projs_bias', 'A_logs',
                            'Ds')),
    'frozen-map': (torch.float32, torch.float32, None, False, ('x', )),
}


def silu_graphs(case, mode, silu_in_op, seed=0):
    """SS2D's core after the SiLU of a channels-last map: the output, the
    gradients of the map and the parameters, and the bytes kept for the
    backward; the SiLU taken by the op (``silu_in_op``) or before it."""
    map_dtype, param_dtype, scan_dtype, autocast, frozen = SILU_MODES[mode]
    x, params = make_params(case, seed)
    leaves = [t.to(dtype).requires_grad_(name not in frozen)
              for name, t, dtype in zip(NAMES, (x, *params.values()),
                                        (map_dtype, ) + (param_dtype, ) * 2 +
                                        (torch.float32, ) * 3)]

    def core():
        v = leaves[0] * 1  # a map made in the graph, as the conv's output
        if silu_in_op:
            return cross_selective_scan(v, *leaves[1:], channels_last=True,
                                        scan_dtype=scan_dtype, silu=True)
        return cross_selective_scan(torch.nn.functional.silu(v), *leaves[1:],
                                    channels_last=True, scan_dtype=scan_dtype)

    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        y, saved = saved_storage_bytes(core)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(y.shape, generator=g)
    wrt = [t for t in leaves if t.requires_grad]
    return y, torch.autograd.grad(y, wrt, dy), saved


@pytest.mark.parametrize('case', [CASES[0], CASES[1], CASES[5], CASES[7]])
@pytest.mark.parametrize('mode', list(SILU_MODES))
def test_fused_silu_equals_the_plain_graph_bitwise(case, mode):
    """SiLU inside the fused op: the outputs and every gradient of the plain
    graph (SiLU, then the op) bit for bit, in their dtypes, keeping the
    SiLU's output less (and its copy in the scan's dtype where that is
    another: a bfloat16 scan of a float32 map; nothing less when only the
    map before it is kept)."""
    y, grads, saved = silu_graphs(case, mode, silu_in_op=False)
    y_new, grads_new, saved_new = silu_graphs(case, mode, silu_in_op=True)
    assert y.dtype == y_new.dtype == torch.float32
    assert len(grads) == len(grads_new) == 6 - len(SILU_MODES[mode][4])
    for a, b in zip((y, *grads), (y_new, *grads_new)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    batch, d_inner, H, W = case[:4]
    map_dtype = SILU_MODES[mode][0]
    u_bytes = batch * H * W * d_inner * map_dtype.itemsize
    # with a scan in another dtype than the map, the op keeps a copy too
    expected = {'bf16-scan': u_bytes * 3 // 2,
                'frozen-map': 0}.get(mode, u_bytes)
    assert saved - saved_new == expected


@pytest.mark.parametrize('silu,autocast', [(False, False), (True, False),
                                            (True, True)])
def test_compiled_front_door_matches_eager_bitwise(silu, autocast):
    """torch.compile(fullgraph=True) of the front door, with and without
    the SiLU taken in the op: the same values and gradients."""
    x, params = make_params(CASES[0], seed=0)

    def loss(x, *weights):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            y = cross_selective_scan(x * 1, *weights, channels_last=True,
                                     silu=silu)
        return (y * y).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend='aot_eager')
    leaves = [t.clone().requires_grad_() for t in (x, *params.values())]
    eager = torch.autograd.grad(loss(*leaves), leaves)
    traced = torch.autograd.grad(compiled(*leaves), leaves)
    for a, b in zip(eager, traced):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize('path', ['unfused', 'channels-first', 'strided'])
def test_silu_elsewhere_than_the_fused_op_is_the_plain_graph(path):
    """silu=True where the fused op does not take it (the unfused path, a
    map whose rows are not contiguous): the plain graph, bit for bit and
    byte for byte."""
    x, params = make_params(CASES[5], seed=0)
    if path == 'channels-first':
        x = x.permute(0, 3, 1, 2).contiguous()
    elif path == 'strided':  # channels-last view of a channels-first map
        x = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    results = []
    for silu_in_op in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, *params.values())]

        def core():
            v = leaves[0] * 1
            if not silu_in_op:
                v = torch.nn.functional.silu(v)
            return cross_selective_scan(
                v, *leaves[1:], channels_last=path != 'channels-first',
                fused=False if path == 'unfused' else None, silu=silu_in_op)

        y, saved = saved_storage_bytes(core)
        results.append((y, torch.autograd.grad(y, leaves, torch.ones_like(y)),
                        saved))
    (y, grads, saved), (y_new, grads_new, saved_new) = results
    assert saved == saved_new
    for a, b in zip((y, *grads), (y_new, *grads_new)):
        assert torch.equal(a, b)


def test_silu_must_be_a_bool():
    x, params = make_params(CASES[0], seed=0)
    with pytest.raises(ValueError, match="silu must be a bool, got 'yes'"):
        cross_selective_scan(x, **params, channels_last=True, silu='yes')
