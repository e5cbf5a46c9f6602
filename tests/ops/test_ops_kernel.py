"""The compiled selective-scan kernels (mmvmamba._C) against a naive loop.

Every case draws fresh random inputs (from a seed each test prints, shown
when it fails; ``MMVMAMBA_TEST_SEED`` repeats it) and compares values and all
gradients with a float64 step-by-step loop written here, and with the
package's PyTorch reference. The same tests run on 'cuda' where a GPU and the
CUDA kernels exist, and are skipped otherwise.
"""
import math
import re

import pytest
import torch
import torch.nn.functional as F

from mmvmamba.ops import _ext
from mmvmamba.ops.backend import kernel_unsupported_reason

LOADED, STATUS = _ext.ext_status()
pytestmark = [
    pytest.mark.skipif(
        not LOADED, reason=f'compiled extension not available: {STATUS}'),
    pytest.mark.usefixtures('reported_seed')
]

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.has_kernel('cuda')),
    reason='needs a GPU and the CUDA kernels')
DEVICES = ['cpu', pytest.param('cuda', marks=needs_cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative error (||out - ref|| / ||ref||) allowed per device and dtype, for
# the output and every gradient; float64 reference on the same (rounded)
# inputs and incoming gradient. CPU: the largest errors of 120 random draws
# per case and dtype were float32 8.7e-7, float16 3.9e-4, bfloat16 3.3e-3:
# 7x for float32, 10x and 6x for the half types. CUDA: not measured here
# (fast-math exp).
TOLERANCE = {
    ('cpu', torch.float32): 6e-6,
    ('cpu', torch.float16): 4e-3,
    ('cpu', torch.bfloat16): 2e-2,
    ('cuda', torch.float32): 2e-5,
    ('cuda', torch.float16): 4e-3,
    ('cuda', torch.bfloat16): 2e-2,
}

# (batch, groups, channels per group, N, L, D, delta_bias, softplus)
CASES = [
    (2, 4, 3, 16, 67, True, True, True),  # VMamba-like, odd L
    (2, 2, 3, 16, 1, True, True, True),  # L = 1 (several channels: one
    # channel's delta gradient alone is a sum over N that can cancel)
    (1, 2, 2, 1, 5, False, False, False),  # N = 1, no D / bias / softplus
    (2, 1, 4, 64, 130, True, False, True),  # N = 64, several CUDA chunks
    (1, 3, 2, 20, 33, False, True, False),  # N not a multiple of 8
    (3, 2, 5, 8, 200, True, True, True),  # batch 3, L over 3 chunks
]
# The CUDA kernels' sequence segments (MMVMAMBA_SCAN_SEGMENT_CHUNKS): six
# chunks of 64 steps, the last one partial, for 4 and 16 lanes per channel.
SEGMENT_CASES = [
    (2, 2, 3, 16, 5 * 64 + 17, True, True, True),
    (1, 1, 5, 64, 5 * 64 + 17, True, False, True),
]
# Ten chunks: split into segments of 4 by default (few blocks on any GPU).
LONG_CASE = (1, 2, 3, 16, 9 * 64 + 5, True, True, True)
SEGMENT_ENV = 'MMVMAMBA_SCAN_SEGMENT_CHUNKS'


def naive_scan(u, delta, A, B, C, D=None, delta_bias=None,
               delta_softplus=False):
    """The recurrence, one step at a time, in float64."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    batch, channels, length = u.shape
    per_group = channels // B.shape[1]
    dt = delta
    if delta_bias is not None:
        dt = dt + delta_bias.double()[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    B = B.repeat_interleave(per_group, dim=1)
    C = C.repeat_interleave(per_group, dim=1)
    h = u.new_zeros(batch, channels, A.shape[1])
    ys = []
    for l in range(length):
        h = torch.exp(dt[..., l, None] * A) * h + (dt[..., l] * u[..., l])[
            ..., None] * B[..., l]
        ys.append((h * C[..., l]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.double()[:, None] * u
    return y


def make_inputs(case, dtype, device, requires_grad=True):
    """Fresh random inputs (never zeros) for one case, from torch's global
    generator (seeded by the ``reported_seed`` fixture)."""
    batch, groups, per_group, d_state, length, with_D, with_bias, softplus = case
    channels = groups * per_group
    g = None

    def rand(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g) * scale + shift

    delta = rand(batch, channels, length, scale=0.5) if softplus else \
        torch.rand(batch, channels, length, generator=g) * 0.5 + 0.05
    args = dict(
        u=rand(batch, channels, length).to(dtype),
        delta=delta.to(dtype),
        A=-torch.exp(rand(channels, d_state, scale=0.5)),
        B=rand(batch, groups, d_state, length).to(dtype),
        C=rand(batch, groups, d_state, length).to(dtype),
        D=rand(channels) if with_D else None,
        delta_bias=None,
    )
    if with_bias:  # keeps dt > 0 without softplus: no growing states
        args['delta_bias'] = rand(channels, scale=0.3) if softplus else \
            torch.rand(channels, generator=g) * 0.1
    args = {
        k: None if v is None else v.to(device).requires_grad_(requires_grad)
        for k, v in args.items()
    }
    return args, softplus


def rel_err(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    scale = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / scale if scale > 0 else diff


def run_with_grads(fn, args, softplus, grad_out):
    """Output and gradients of every tensor argument, in argument order."""
    names = [k for k, v in args.items() if v is not None]
    y = fn(**args, delta_softplus=softplus)
    grads = torch.autograd.grad(y, [args[k] for k in names],
                                grad_out.to(y.dtype))
    return y, dict(zip(names, grads))


def check_against(fn_ref, case, dtype, device):
    args, softplus = make_inputs(case, dtype, device)
    # Rounded to the kernel's dtype first, so that the reference sees the
    # incoming gradient the kernel sees: a float64 one made bfloat16's
    # gradient of A (a sum over few steps that can cancel) miss by 4e-2.
    grad_out = torch.randn(args['u'].shape).to(dtype).double()
    y, grads = run_with_grads(_ext.selective_scan_kernel, args, softplus,
                              grad_out.to(device))
    ref_args = {
        k: None if v is None else v.detach().cpu().double().requires_grad_()
        for k, v in args.items()
    }
    y_ref, grads_ref = run_with_grads(fn_ref, ref_args, softplus, grad_out)
    assert y.dtype == dtype and y.shape == y_ref.shape
    tol = TOLERANCE[(torch.device(device).type, dtype)]
    errors = {'y': rel_err(y, y_ref)}
    for name, grad in grads.items():
        assert grad.dtype == args[name].dtype, name
        assert grad.shape == args[name].shape, name
        assert torch.isfinite(grad).all(), name
        errors[name] = rel_err(grad, grads_ref[name])
    print(f'relative errors {case} {dtype} {device}: max '
          f'{max(errors.values()):.2e}')
    bad = {k: f'{v:.2e}' for k, v in errors.items() if not v <= tol}
    assert not bad, f'relative errors above {tol}: {bad}'


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('case', CASES, ids=str)
def test_kernel_matches_naive_loop(case, dtype, device):
    check_against(naive_scan, case, dtype, device)


@needs_cuda
@pytest.mark.parametrize('segment_chunks', ['1', '2', '4'])
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('case', SEGMENT_CASES, ids=str)
def test_segmented_kernel_matches_naive_loop(case, dtype, segment_chunks,
                                             monkeypatch):
    """Segments of 1, 2 and 4 chunks (6, 3 and 2 segments), scanned in
    parallel and chained by the carry pass, forward and backward."""
    monkeypatch.setenv(SEGMENT_ENV, segment_chunks)
    check_against(naive_scan, case, dtype, 'cuda')


@needs_cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
def test_default_segments_match_naive_loop(dtype, monkeypatch):
    monkeypatch.delenv(SEGMENT_ENV, raising=False)
    check_against(naive_scan, LONG_CASE, dtype, 'cuda')


@needs_cuda
def test_zero_segment_chunks_forces_one_segment(monkeypatch):
    """0 scans the whole sequence in one segment: y is bitwise that of
    segments longer than the sequence, and equals a segmented run's up to
    float rounding."""
    args, softplus = make_inputs(LONG_CASE, torch.float32, 'cuda')
    grad_out = torch.randn(args['u'].shape, device='cuda')
    runs = {}
    for value in ('0', '10', '2'):
        monkeypatch.setenv(SEGMENT_ENV, value)
        runs[value] = run_with_grads(_ext.selective_scan_kernel, args,
                                     softplus, grad_out)
    (y, grads), (y_one, grads_one), (y_seg, grads_seg) = runs.values()
    assert torch.equal(y, y_one)
    assert rel_err(y, y_seg) < 1e-5
    for name, grad in grads.items():
        assert rel_err(grad, grads_one[name]) < 1e-6, name
        assert rel_err(grad, grads_seg[name]) < 1e-5, name


@needs_cuda
@pytest.mark.parametrize('value', ['abc', '-3', '2.5', ' 4'])
def test_bad_segment_chunks_raise(value, monkeypatch):
    args, softplus = make_inputs(CASES[0], torch.float32, 'cuda', False)
    fwd_args = (args['u'], args['delta'], args['A'], args['B'], args['C'],
                args['D'], args['delta_bias'], softplus)
    y, checkpoints = torch.ops.mmvmamba.selective_scan_fwd(*fwd_args)
    monkeypatch.setenv(SEGMENT_ENV, value)
    match = f"{SEGMENT_ENV} must be a non-negative integer.*got " + \
        re.escape(f"'{value}'")
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mmvmamba.selective_scan_fwd(*fwd_args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mmvmamba.selective_scan_bwd(y, *fwd_args, checkpoints)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('case', CASES[:4], ids=str)
def test_kernel_matches_reference(case, device):
    from mmvmamba.ops import selective_scan_reference
    check_against(selective_scan_reference, case, torch.float32, device)


@pytest.mark.parametrize('device', DEVICES)
def test_non_contiguous_inputs(device):
    args, softplus = make_inputs(CASES[0], torch.float32, device, False)
    strided = {
        k: None if v is None else v.transpose(-1, -2).contiguous().transpose(
            -1, -2) if v.dim() > 1 else v
        for k, v in args.items()
    }
    assert not strided['u'].is_contiguous()
    y = _ext.selective_scan_kernel(**strided, delta_softplus=softplus)
    y_ref = _ext.selective_scan_kernel(**args, delta_softplus=softplus)
    assert torch.equal(y, y_ref)


@pytest.mark.parametrize('device', DEVICES)
def test_zero_sized_inputs(device):
    args, softplus = make_inputs(CASES[0], torch.float32, device, False)
    args['u'] = args['u'][:0]
    args['delta'] = args['delta'][:0]
    args['B'] = args['B'][:0]
    args['C'] = args['C'][:0]
    y = _ext.selective_scan_kernel(**args, delta_softplus=softplus)
    assert y.shape == args['u'].shape


@pytest.mark.parametrize('device', DEVICES)
def test_opcheck(device):
    args, softplus = make_inputs(CASES[0], torch.float32, device)
    fwd_args = (args['u'], args['delta'], args['A'], args['B'], args['C'],
                args['D'], args['delta_bias'], softplus)
    torch.library.opcheck(torch.ops.mmvmamba.selective_scan_fwd.default,
                          fwd_args)
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a
                  for a in fwd_args)
    y, checkpoints = torch.ops.mmvmamba.selective_scan_fwd(*plain)
    torch.library.opcheck(torch.ops.mmvmamba.selective_scan_bwd.default,
                          (torch.randn_like(y), *plain, checkpoints))


@pytest.mark.parametrize('device', DEVICES)
def test_torch_compile_fullgraph(device):
    args, softplus = make_inputs(CASES[0], torch.float32, device)

    def loss(u, delta, A, B, C, D, delta_bias):
        y = _ext.selective_scan_kernel(u, delta, A, B, C, D, delta_bias,
                                       softplus)
        return (y * y).sum()

    compiled = torch.compile(loss, fullgraph=True, backend='aot_eager')
    values = list(args.values())
    eager = torch.autograd.grad(loss(*values), values)
    traced = torch.autograd.grad(compiled(*values), values)
    for a, b in zip(eager, traced):
        assert rel_err(b, a) < 1e-6


@pytest.mark.parametrize('device', DEVICES)
def test_bad_inputs_raise(device):
    args, _ = make_inputs(CASES[0], torch.float32, device, False)
    fwd = torch.ops.mmvmamba.selective_scan_fwd

    def call(**changes):
        kw = dict(args, **changes)
        return fwd(kw['u'], kw['delta'], kw['A'], kw['B'], kw['C'], kw['D'],
                   kw['delta_bias'], True)

    u, B, A = args['u'], args['B'], args['A']
    five = torch.randn(u.shape[0], 5, B.shape[2], u.shape[2], device=device)
    bad = [  # u (2, 12, 67): 4 groups of 3 channels, N 16, L 67
        (dict(A=A.half()), 'A must be float32, got Half'),
        (dict(delta=args['delta'].half()),
         "delta, B and C must have u's dtype Float, got Half, Float, Float"),
        (dict(u=u[..., :-1]),
         r"delta must have u's shape \(2, 12, 66\), got \(2, 12, 67\)"),
        (dict(u=u[0]),
         r'u must be \(batch, channels, L\), got shape \(12, 67\)'),
        (dict(B=B[:, :, :-1]), r'B must be \(batch, groups, N, L\) = '
         r'\(2, G, 16, 67\), got \(2, 4, 15, 67\)'),
        (dict(A=torch.randn(A.shape[0], 65, device=device)),
         'the kernel covers 1 <= N <= 64, got N = 65'),
        (dict(D=args['D'][:-1]), r'D must have shape \(12,\), got \(11,\)'),
        (dict(delta_bias=args['delta_bias'].double()),
         'delta_bias must be float32, got Double'),
        (dict(u=u.double(), delta=args['delta'].double(), B=B.double(),
              C=args['C'].double()),
         'u must be float32, float16 or bfloat16, got Double'),
        (dict(B=five, C=five), '5 groups do not divide 12 channels'),
    ]
    for changes, match in bad:
        with pytest.raises(RuntimeError, match='selective_scan: ' + match):
            call(**changes)
    y, checkpoints = call()
    with pytest.raises(RuntimeError, match=r'selective_scan backward: '
                       r'grad_out must be like u \(Float, \(2, 12, 67\), '
                       r'(cpu|cuda:0)\), got Float, \(2, 12, 66\)'):
        torch.ops.mmvmamba.selective_scan_bwd(y[..., :-1], u, args['delta'],
                                              A, B, args['C'], args['D'],
                                              args['delta_bias'], True,
                                              checkpoints)
    if device == 'cuda':
        with pytest.raises(RuntimeError, match='selective_scan: all tensors '
                           'must be on one device, got cpu and cuda'):
            call(A=A.cpu())
        with pytest.raises(RuntimeError, match="selective_scan backward: "
                           "checkpoints must be the forward's float32 "
                           r'\(batch, channels, chunks, N\) tensor'):
            torch.ops.mmvmamba.selective_scan_bwd(
                y, u, args['delta'], A, B, args['C'], args['D'],
                args['delta_bias'], True, checkpoints[:, :, :1])


ISA_ENV = 'MMVMAMBA_CPU_ISA'


def test_cpu_isa_switch(monkeypatch):
    """MMVMAMBA_CPU_ISA picks the CPU row kernels at each call."""
    monkeypatch.delenv(ISA_ENV, raising=False)
    best = torch.ops.mmvmamba.cpu_isa()
    assert best in ('avx2', 'generic')
    for value, expected in (('', best), ('auto', best),
                            ('generic', 'generic')):
        monkeypatch.setenv(ISA_ENV, value)
        assert torch.ops.mmvmamba.cpu_isa() == expected
    args, softplus = make_inputs(CASES[0], torch.float32, 'cpu', False)
    monkeypatch.setenv(ISA_ENV, 'sse4')
    match = f"{ISA_ENV} must be auto, avx512, avx2 or generic, got 'sse4'"
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mmvmamba.cpu_isa()
    with pytest.raises(RuntimeError, match=match):
        _ext.selective_scan_kernel(**args, delta_softplus=softplus)
    monkeypatch.setenv(ISA_ENV, 'avx2')
    if best == 'avx2':
        assert torch.ops.mmvmamba.cpu_isa() == 'avx2'
    else:
        with pytest.raises(RuntimeError, match='has no avx2'):
            torch.ops.mmvmamba.cpu_isa()


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('case', CASES, ids=str)
def test_generic_cpu_kernel_matches_naive_loop(case, dtype, monkeypatch):
    """The portable CPU rows (what a processor without AVX2 runs), here on
    any x86-64 through MMVMAMBA_CPU_ISA=generic."""
    monkeypatch.setenv(ISA_ENV, 'generic')
    assert torch.ops.mmvmamba.cpu_isa() == 'generic'
    check_against(naive_scan, case, dtype, 'cpu')


def test_generic_and_avx2_rows_are_different_code(monkeypatch):
    """Both run, and round differently (AVX2's FMA), so the switch does
    reach the kernels."""
    monkeypatch.delenv(ISA_ENV, raising=False)
    if torch.ops.mmvmamba.cpu_isa() != 'avx2':
        pytest.skip('no AVX2 kernels on this processor or build')
    args, softplus = make_inputs(CASES[0], torch.float32, 'cpu')
    grad_out = torch.randn(args['u'].shape)
    runs = []
    for isa in ('generic', 'avx2'):
        monkeypatch.setenv(ISA_ENV, isa)
        runs.append(run_with_grads(_ext.selective_scan_kernel, args,
                                   softplus, grad_out))
    (y_gen, grads_gen), (y_avx, grads_avx) = runs
    assert not torch.equal(y_gen, y_avx)
    assert rel_err(y_gen, y_avx) < 1e-5
    assert any(not torch.equal(grads_gen[k], grads_avx[k]) for k in grads_gen)


def test_status_and_support():
    loaded, status = _ext.ext_status()
    assert loaded and 'loaded' in status
    assert _ext.has_kernel('cpu')
    assert not _ext.has_kernel('mps')
    u = torch.zeros(1, 2, 3)
    assert kernel_unsupported_reason(u, torch.zeros(2, 16)) is None
    assert 'N=80' in kernel_unsupported_reason(u, torch.zeros(2, 80))
    assert 'float64' in kernel_unsupported_reason(u.double(),
                                                  torch.zeros(2, 16))


def test_library_records_torch_version():
    files = _ext._library_files()
    assert files
    built = _ext._built_torch_version(files[0])
    assert built == torch.__version__.split('+')[0]
    reason = _ext._explain_load_failure(ImportError('undefined symbol: x'))
    assert 'pip install --no-deps --no-build-isolation -e .' in reason


def test_vmamba_shape_smoke():
    """A VMamba-T stage-3 shape (4 directions, 2C = 768 channels each)."""
    batch, groups, per_group, d_state, length = 1, 4, 768, 16, 49
    case = (batch, groups, per_group, d_state, length, True, True, True)
    args, softplus = make_inputs(case, torch.float32, 'cpu', False)
    y = _ext.selective_scan_kernel(**args, delta_softplus=softplus)
    assert math.isfinite(y.abs().sum().item())
