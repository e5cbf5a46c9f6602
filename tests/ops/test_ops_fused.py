"""The fused four-direction CUDA scan (``cross_selective_scan`` on a GPU).

Every case draws fresh random inputs (from a seed each test prints, shown
when it fails; ``MMVMAMBA_TEST_SEED`` repeats it) and compares the fused
path's output and every gradient with the unfused path run in float64 on the
PyTorch reference; each test prints the relative errors it measured
(``pytest -rA`` shows them). Skipped without a GPU and the fused kernel; the
CPU half of the front door is covered in ``test_ops_reference.py``.
"""
import pytest
import torch
from torch.backends import cudnn

from mmvmamba.models import VMamba
from mmvmamba.ops import _ext, cross_selective_scan

pytestmark = [
    pytest.mark.skipif(
        not (torch.cuda.is_available() and _ext.has_cross_kernel()),
        reason='needs a GPU and the fused CUDA kernel'),
    pytest.mark.usefixtures('reported_seed')
]

# (batch, D, H, W, R, N)
CASES = [
    (2, 24, 7, 5, 3, 16),  # odd H != W
    (1, 40, 13, 9, 4, 16),  # batch 1, D not a multiple of 32
    (1, 8, 1, 1, 2, 4),  # L = 1
    (2, 96, 20, 17, 6, 16),  # VMamba-T stage 0 width, several chunks
    (1, 33, 11, 30, 48, 16),  # rank 48 (stage 3), L over 5 chunks
    (1, 16, 3, 30, 1, 1),  # N = 1, R = 1
    (2, 40, 9, 15, 20, 8),  # N = 8, R = 20; the last chunk 7 steps
    (2, 33, 10, 14, 12, 16),  # R = 12 (VMamba-T stage 1), D odd
    (1, 64, 8, 17, 64, 16),  # R = 64 (VMamba-B stage 3)
    (1, 24, 5, 13, 70, 16),  # R = 70: rank rows past 64; the last chunk 1 step
    (2, 40, 9, 15, 20, 15),  # N = 15 (a padding state among 16), kept decays
    (2, 48, 14, 14, 24, 16),  # VMamba-T stage 2: L = 196 (last chunk 4 steps),
    # the forward's step sizes on the tensor cores (R = 24)
    (1, 40, 9, 15, 24, 1),  # the same forward at N = 1 (the general kernel)
    (2, 24, 7, 9, 33, 8),  # and at N = 8, R = 33 (dt_pitch 36: 3 padding)
    (1, 33, 11, 30, 6, 12),  # N = 12, decays not kept
]
# The kernels' sequence segments (MMVMAMBA_SCAN_SEGMENT_CHUNKS): L = 407,
# seven chunks of 64 steps, the last one partial, two channel blocks.
SEGMENT_CASE = (2, 40, 11, 37, 4, 16)
# The same with R = 20 and N = 15: the backward that keeps decays.
KEEP_SEGMENT_CASE = (2, 40, 11, 37, 20, 15)
# The same with R = 48: the forward's step sizes on the tensor cores.
TENSOR_SEGMENT_CASE = (2, 40, 11, 37, 48, 16)
# Twelve chunks: split into segments of 4 by default (few blocks on any GPU).
LONG_CASE = (1, 16, 24, 30, 2, 16)
SEGMENT_ENV = 'MMVMAMBA_SCAN_SEGMENT_CHUNKS'
# The N = 1 kernels (csrc/cuda/cross_scan_n1.cu), forced on with
# MMVMAMBA_SCAN_N1=1 (by default they run only where the launch fills the
# GPU): L = 1 and D = 1; odd H, W and D; H = 1; W = 1 with R = 48; two
# channel blocks (D = 200); a long sequence (64 chunks).
N1_ENV = 'MMVMAMBA_SCAN_N1'
N1_CASES = [
    (1, 1, 1, 1, 1, 1),
    (3, 33, 5, 7, 6, 1),
    (1, 96, 13, 10, 6, 1),
    (3, 96, 1, 9, 1, 1),
    (2, 40, 9, 1, 48, 1),
    (2, 200, 7, 7, 12, 1),
    (1, 33, 64, 64, 6, 1),
]
# (x dtype, scan dtype) -> relative error allowed for output and gradients.
TOLERANCE = {
    (torch.float32, torch.float32): 1e-4,
    (torch.float32, torch.bfloat16): 3e-2,
    (torch.bfloat16, torch.float32): 3e-2,
    (torch.float16, torch.float32): 1e-2,
}


def make_params(case, device, seed=None):
    """Fresh SS2D parameters in float32 as the authors initialise them,
    from ``seed`` or else torch's global generator (seeded by the
    ``reported_seed`` fixture)."""
    batch, d_inner, H, W, rank, d_state = case
    g = None if seed is None else torch.Generator().manual_seed(seed)
    bound = rank**-0.5
    params = dict(
        x_proj_weight=torch.randn(4, rank + 2 * d_state, d_inner,
                                  generator=g) * d_inner**-0.5,
        dt_projs_weight=(torch.rand(4, d_inner, rank, generator=g) * 2 - 1) *
        bound,
        dt_projs_bias=torch.rand(4, d_inner, generator=g) * 4 - 5,
        A_logs=torch.log(torch.rand(4 * d_inner, d_state, generator=g) * 8 +
                         0.5),
        Ds=torch.randn(4 * d_inner, generator=g))
    x = torch.randn(batch, H, W, d_inner, generator=g)
    return x.to(device), {k: v.to(device) for k, v in params.items()}


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() /
            ref.double().norm().clamp_min(1e-30)).item()


def run(x, params, fused, scan_dtype=None, x_dtype=None):
    """Output and gradients of x and every parameter for a fixed dy."""
    x = x.to(x_dtype or x.dtype).detach().requires_grad_()
    params = {k: v.detach().requires_grad_() for k, v in params.items()}
    y = cross_selective_scan(x, **params, channels_last=True,
                             scan_dtype=scan_dtype, fused=fused)
    torch.manual_seed(0)
    dy = torch.randn(y.shape, dtype=torch.float64).to(y.device, y.dtype)
    grads = torch.autograd.grad((y * dy).sum(), [x, *params.values()])
    return y, dict(zip(['x', *params], grads))


def check_against_reference(case, dtypes):
    """The fused path against the unfused one in float64, fresh inputs."""
    x_dtype, scan_dtype = dtypes
    x, params = make_params(case, 'cuda')
    y, grads = run(x, params, fused=True, scan_dtype=scan_dtype,
                   x_dtype=x_dtype)
    assert y.dtype == torch.float32 and y.shape == x.shape
    y_ref, grads_ref = run(x.double(),
                           {k: v.double()
                            for k, v in params.items()},
                           fused=False)
    tol = TOLERANCE[dtypes]
    errors = {'y': rel_err(y, y_ref)}
    for name, grad in grads.items():
        assert grad.dtype == (x_dtype if name == 'x' else torch.float32)
        errors[name] = rel_err(grad, grads_ref[name])
    print(f'relative errors {case} {dtypes}: max '
          f'{max(errors.values()):.2e}; {errors}')
    bad = {k: f'{v:.2e}' for k, v in errors.items() if not v < tol}
    assert not bad, f'relative errors above {tol}: {bad}'


@pytest.mark.parametrize('dtypes', list(TOLERANCE), ids=str)
@pytest.mark.parametrize('case', CASES, ids=str)
def test_fused_matches_float64_reference(case, dtypes):
    check_against_reference(case, dtypes)


@pytest.mark.parametrize('dtypes', list(TOLERANCE), ids=str)
@pytest.mark.parametrize('case', N1_CASES, ids=str)
def test_n1_kernels_match_float64_reference(case, dtypes, monkeypatch):
    monkeypatch.setenv(N1_ENV, '1')
    check_against_reference(case, dtypes)


def raw_cross_args(case, dtype, seed=0):
    """Arguments of cross_scan_fwd for a case, and an output gradient."""
    x, params = make_params(case, 'cuda', seed=seed + 1)
    batch, H, W, d_inner = x.shape
    x_dbl = torch.einsum('bhwd,kcd->bhwkc', x, params['x_proj_weight'])
    args = (x.reshape(batch, H * W, d_inner).to(dtype),
            x_dbl.reshape(batch, H * W, 4, -1).to(dtype),
            params['dt_projs_weight'], params['dt_projs_bias'],
            -torch.exp(params['A_logs']), params['Ds'], H, W)
    g = torch.Generator(device='cuda').manual_seed(seed)
    dy = torch.randn(batch, H * W, d_inner, generator=g, device='cuda')
    return args, dy


def raw_fwd_bwd(args, dy, fwd_mode, bwd_mode, monkeypatch):
    ops = torch.ops.mmvmamba
    monkeypatch.setenv(N1_ENV, fwd_mode)
    y, checkpoints = ops.cross_scan_fwd(*args)
    monkeypatch.setenv(N1_ENV, bwd_mode)
    grads = ops.cross_scan_bwd(dy, *args, checkpoints)
    return y, checkpoints, grads


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize('case', [(3, 33, 5, 7, 6, 1), (2, 96, 20, 17, 12, 1),
                                  (1, 40, 9, 1, 48, 1)], ids=str)
def test_n1_kernels_agree_with_the_generic_ones(case, dtype, monkeypatch):
    """Raw ops, specialised against generic kernels in one process, and
    their checkpoints interchangeable (either backward after either
    forward)."""
    args, dy = raw_cross_args(case, dtype)
    y0, ck0, g0 = raw_fwd_bwd(args, dy, '0', '0', monkeypatch)
    y1, ck1, g1 = raw_fwd_bwd(args, dy, '1', '1', monkeypatch)
    assert ck1.shape == ck0.shape == (case[0], 4 * case[1],
                                      -(-case[2] * case[3] // 64), 1)
    assert rel_err(y1, y0) < 1e-5
    assert rel_err(ck1, ck0) < 1e-5
    names = ['du', 'dx_dbl', 'ddt_weight', 'ddt_bias', 'dA', 'dD']

    def tol(name):
        # bfloat16 du / dx_dbl are rounded once from float32 sums.
        return 1e-2 if dtype == torch.bfloat16 and name in names[:2] else 1e-4

    for name, a, b in zip(names, g1, g0):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert rel_err(a, b) < tol(name), name
    for modes in (('1', '0'), ('0', '1')):
        _, _, g = raw_fwd_bwd(args, dy, *modes, monkeypatch)
        for name, a, b in zip(names, g, g0):
            assert rel_err(a, b) < tol(name), (modes, name)


def test_n1_setting_must_be_known(monkeypatch):
    args, _ = raw_cross_args((1, 8, 3, 3, 2, 1), torch.float32)
    monkeypatch.setenv(N1_ENV, 'yes')
    with pytest.raises(RuntimeError, match=f'{N1_ENV} must be 0'):
        torch.ops.mmvmamba.cross_scan_fwd(*args)


@pytest.mark.parametrize('segment_chunks', ['1', '2', '3'])
@pytest.mark.parametrize('dtypes', list(TOLERANCE), ids=str)
def test_segmented_fused_matches_float64_reference(dtypes, segment_chunks,
                                                   monkeypatch):
    """Segments of 1, 2 and 3 chunks (7, 4 and 3 segments), scanned in
    parallel and chained by the carry pass, forward and backward."""
    monkeypatch.setenv(SEGMENT_ENV, segment_chunks)
    check_against_reference(SEGMENT_CASE, dtypes)


@pytest.mark.parametrize('segment_chunks', ['1', '2'])
def test_segmented_keep_decays_matches_float64_reference(
        segment_chunks, monkeypatch):
    """Segments through the backward that keeps its decays (R = 20)."""
    monkeypatch.setenv(SEGMENT_ENV, segment_chunks)
    check_against_reference(KEEP_SEGMENT_CASE, (torch.float32, torch.float32))


@pytest.mark.parametrize('segment_chunks', ['1', '3'])
def test_segmented_tensor_step_sizes_match_float64_reference(
        segment_chunks, monkeypatch):
    """Segments through the forward whose step sizes are products on the
    tensor cores (R = 48; its summaries keep the FMA pipes)."""
    monkeypatch.setenv(SEGMENT_ENV, segment_chunks)
    check_against_reference(TENSOR_SEGMENT_CASE,
                            (torch.float32, torch.float32))


def forward_on_tensor_cores(case):
    """Whether the fused forward at ``case`` ran the kernel with its step
    sizes on the tensor cores (from the profiler's kernel name)."""
    from torch.profiler import ProfilerActivity, profile
    x, params = make_params(case, 'cuda')
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        cross_selective_scan(x, **params, channels_last=True, fused=True)
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages() if 'scan_fwd_kernel' in e.key]
    assert len(names) == 1, names
    return ', true>' in names[0]


def skip_unless_228_kib_a_sm():
    props = torch.cuda.get_device_properties(0)
    if props.shared_memory_per_multiprocessor != 228 * 1024:
        pytest.skip('the expected kernels are those of 228 KiB a SM')
    return props


@pytest.mark.parametrize('rank, tensor', [(6, False), (20, False), (24, True),
                                          (48, True), (70, True)])
def test_forward_step_sizes_on_tensor_cores_by_rank(rank, tensor):
    """The forward's kernel (``tensor_step_sizes`` in scan_launch.cuh):
    step sizes on the tensor cores from R = 24 on and where the rank's
    shared memory holds an SM to 4 blocks or fewer, on the FMA pipes
    elsewhere. The latter depends on the SM's shared memory: these are an
    H100's / H200's (228 KiB: from R = 32)."""
    skip_unless_228_kib_a_sm()
    assert forward_on_tensor_cores((2, 40, 9, 15, rank, 16)) == tensor


@pytest.mark.parametrize('waves_of_four, tensor', [(1, True), (2, False)])
def test_forward_step_sizes_on_the_fma_pipes_where_they_add_a_wave(
        waves_of_four, tensor):
    """At R = 24 (5 blocks a SM on the FMA pipes, 4 on the tensor cores):
    the tensor cores for blocks that fill a wave of 4 a SM, the FMA pipes
    for more blocks than that up to a wave of 5 (2 waves against 1, as
    VMamba-T's stage 2 at 1024 x 1024, batch 6)."""
    sms = skip_unless_228_kib_a_sm().multi_processor_count
    per_image = 4 * 2  # directions x 32-channel blocks of 40 channels
    batch = (waves_of_four * 4 * sms if tensor else 5 * sms) // per_image
    assert (batch * per_image > 4 * sms) == (not tensor)
    assert forward_on_tensor_cores((batch, 40, 5, 7, 24, 16)) == tensor


def test_default_segments_match_float64_reference(monkeypatch):
    monkeypatch.delenv(SEGMENT_ENV, raising=False)
    check_against_reference(LONG_CASE, (torch.float32, torch.float32))


def test_zero_segment_chunks_forces_one_segment(monkeypatch):
    """0 scans the whole sequence in one segment, as segments longer than
    the sequence do; a segmented run agrees up to float rounding (the
    directions meet in atomics: no bitwise comparison)."""
    x, params = make_params(LONG_CASE, 'cuda')
    runs = []
    for value in ('0', '12', '2'):
        monkeypatch.setenv(SEGMENT_ENV, value)
        runs.append(run(x, params, fused=True))
    (y, grads), (y_one, grads_one), (y_seg, grads_seg) = runs
    assert rel_err(y, y_one) < 1e-6
    assert rel_err(y, y_seg) < 1e-5
    for name, grad in grads.items():
        assert rel_err(grad, grads_one[name]) < 1e-6, name
        assert rel_err(grad, grads_seg[name]) < 1e-5, name


@pytest.mark.parametrize('value', ['abc', '-3'])
def test_bad_segment_chunks_raise(value, monkeypatch):
    x, params = make_params(CASES[0], 'cuda')
    monkeypatch.setenv(SEGMENT_ENV, value)
    with pytest.raises(RuntimeError,
                       match=f'{SEGMENT_ENV} must be a non-negative integer'):
        cross_selective_scan(x, **params, channels_last=True, fused=True)


def test_fused_equals_unfused_kernel_path():
    """Same float32 numerics as the four-copy path on the plain kernel."""
    x, params = make_params(CASES[3], 'cuda')
    y_fused, g_fused = run(x, params, fused=True)
    y_plain, g_plain = run(x, params, fused=False)
    assert rel_err(y_fused, y_plain) < 1e-5
    for name in g_fused:
        assert rel_err(g_fused[name], g_plain[name]) < 1e-4, name


def test_bfloat16_map_reads_like_its_float32_upcast():
    """A bf16 map goes to the kernel as it is for a float32 scan: the kernel
    computes in float32, so the result is that of the exact upcast."""
    x, params = make_params(CASES[3], 'cuda')
    batch, H, W, d_inner = x.shape
    u = x.reshape(batch, H * W, d_inner).bfloat16()
    x_dbl = torch.einsum('bld,kcd->blkc', u.float(),
                         params['x_proj_weight']).bfloat16()
    rest = (params['dt_projs_weight'], params['dt_projs_bias'],
            -torch.exp(params['A_logs']), params['Ds'], H, W)

    def run(u, x_dbl):
        u, x_dbl = u.detach().requires_grad_(), x_dbl.detach().requires_grad_()
        y = _ext.cross_scan_kernel(u, x_dbl, *rest)
        torch.manual_seed(1)
        du, dx = torch.autograd.grad(y, [u, x_dbl], torch.randn_like(y))
        return y, du, dx

    y16, du16, dx16 = run(u, x_dbl)
    y32, du32, dx32 = run(u.float(), x_dbl.float())
    assert rel_err(y16, y32) < 1e-6
    assert rel_err(du16, du32.bfloat16()) < 1e-3
    assert rel_err(dx16, dx32.bfloat16()) < 1e-3
    with torch.autocast('cuda', dtype=torch.bfloat16):
        fused = cross_selective_scan(x.bfloat16(), **params,
                                     channels_last=True)
    assert fused.dtype == torch.float32


def test_channels_first_layout():
    x, params = make_params(CASES[0], 'cuda')
    y_last = cross_selective_scan(x, **params, channels_last=True)
    y_first = cross_selective_scan(x.permute(0, 3, 1, 2), **params)
    torch.testing.assert_close(y_first, y_last.permute(0, 3, 1, 2))


def test_opcheck():
    x, params = make_params(CASES[0], 'cuda')
    batch, H, W, d_inner = x.shape
    x_dbl = torch.einsum('bhwd,kcd->bhwkc', x, params['x_proj_weight'])
    args = (x.reshape(batch, H * W, d_inner), x_dbl.reshape(batch, H * W, 4,
                                                              -1),
            params['dt_projs_weight'], params['dt_projs_bias'],
            -torch.exp(params['A_logs']), params['Ds'], H, W)
    torch.library.opcheck(torch.ops.mmvmamba.cross_scan_fwd.default, args)
    y, checkpoints = torch.ops.mmvmamba.cross_scan_fwd(*args)
    torch.library.opcheck(torch.ops.mmvmamba.cross_scan_bwd.default,
                          (torch.randn_like(y), *args, checkpoints))


def test_bad_inputs_raise_clear_errors():
    x, params = make_params(CASES[0], 'cuda')
    batch, H, W, d_inner = x.shape
    u = x.reshape(batch, H * W, d_inner)
    x_dbl = torch.zeros(batch, H * W, 4, 3 + 32, device='cuda')
    A = -torch.exp(params['A_logs'])
    good = (u, x_dbl, params['dt_projs_weight'], params['dt_projs_bias'], A,
            params['Ds'], H, W)
    with pytest.raises(RuntimeError, match='height x width'):
        torch.ops.mmvmamba.cross_scan_fwd(*good[:6], H + 1, W)
    with pytest.raises(RuntimeError, match='x_dbl must be'):
        torch.ops.mmvmamba.cross_scan_fwd(u, x_dbl[..., :-1], *good[2:])
    with pytest.raises(RuntimeError,
                       match='u must be float32, float16 or bfloat16'):
        torch.ops.mmvmamba.cross_scan_fwd(u.double(), x_dbl.double(),
                                          *good[2:])
    with pytest.raises(RuntimeError, match='dt_bias must have shape'):
        torch.ops.mmvmamba.cross_scan_fwd(*good[:3], good[3][:, :-1],
                                          *good[4:])
    with pytest.raises(ValueError, match='fused=True'):
        cross_selective_scan(x.double(), **params, channels_last=True,
                             fused=True)


@pytest.mark.parametrize('scan_dtype', ['float32', 'bfloat16'])
def test_compiled_backbone_matches_eager(scan_dtype):
    torch._dynamo.reset()
    model = VMamba(
        dict(embed_dims=32, depths=[1, 2, 1, 1]),
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.,
        scan_dtype=scan_dtype).cuda()
    x = torch.randn(2, 3, 70, 90, device='cuda')
    compiled = torch.compile(model, fullgraph=True)
    eager_outs = model(x)
    compiled_outs = compiled(x)
    for a, b in zip(eager_outs, compiled_outs):
        assert rel_err(b, a) < 1e-4
    # A random projection of the outputs: a plain sum of LayerNorm outputs
    # has gradients that are rounding noise.
    weights = [torch.randn_like(o) for o in eager_outs]

    def grads(outs):
        loss = sum((o * w).sum() for o, w in zip(outs, weights))
        return torch.autograd.grad(loss, list(model.parameters()))

    for a, b in zip(grads(eager_outs), grads(compiled_outs)):
        assert rel_err(b, a) < 1e-3


def test_whole_model_fused_matches_reference(monkeypatch):
    """VMamba-T on the fused kernel against the float64 reference model.

    TF32 is off (cuDNN's default TF32 convolutions add ~1e-3 errors), and the
    loss is a random projection of the outputs: ``mean(o ** 2)`` of
    LayerNorm outputs has an exactly zero gradient upstream of the norms, so
    its computed gradients are rounding noise (relative errors ~1e-2 in
    float32 on any backend).
    """
    monkeypatch.setattr(cudnn, 'allow_tf32', False)
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)
    torch.manual_seed(0)
    model = VMamba('tiny', out_indices=(0, 1, 2, 3),
                   drop_path_rate=0.).cuda()
    x = torch.randn(2, 3, 163, 227, device='cuda')
    outs = model(x)
    weights = [torch.randn_like(o, dtype=torch.float64) for o in outs]

    def grads(outs, model):
        loss = sum((o * w.to(o.dtype)).sum() for o, w in zip(outs, weights))
        return torch.autograd.grad(loss, list(model.parameters()))

    fused_grads = grads(outs, model)
    ref = model.double()
    ref_outs = ref(x.double())
    ref_grads = grads(ref_outs, ref)
    for a, b in zip(outs, ref_outs):
        assert rel_err(a, b) < 1e-5
    errors = [rel_err(a, b) for a, b in zip(fused_grads, ref_grads)]
    print(f'gradient rel. errors: median {sorted(errors)[len(errors) // 2]:.2e}'
          f', max {max(errors):.2e}')
    assert max(errors) < 1e-4
