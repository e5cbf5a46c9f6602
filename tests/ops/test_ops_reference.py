"""The pure-PyTorch ops against independent step-by-step constructions."""
import pytest
import torch
import torch.nn.functional as F

from mmvmamba.ops import (cross_merge, cross_scan, cross_selective_scan,
                          selective_scan, selective_scan_reference)
from mmvmamba.ops.backend import RecordScans, use_backend


def recurrence(u, delta, A, B, C, D=None, delta_bias=None, softplus=False):
    """The scan as written in the paper: one position at a time."""
    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    if softplus:
        dt = F.softplus(dt)
    batch, channels, length = u.shape
    per_group = channels // B.shape[1]
    Bc = B.repeat_interleave(per_group, dim=1)
    Cc = C.repeat_interleave(per_group, dim=1)
    h = u.new_zeros(batch, channels, A.shape[1])
    ys = []
    for t in range(length):
        h = torch.exp(dt[..., t, None] * A) * h + \
            (dt[..., t] * u[..., t])[..., None] * Bc[..., t]
        ys.append((h * Cc[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    return y if D is None else y + D[:, None] * u


def random_scan_inputs(batch, groups, per_group, d_state, length,
                       dtype=torch.float64, with_d=True, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    channels = groups * per_group

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale)

    return dict(
        u=rnd(batch, channels, length),
        delta=rnd(batch, channels, length, scale=0.5),
        A=-torch.rand(channels, d_state, generator=g, dtype=dtype) * 2,
        B=rnd(batch, groups, d_state, length),
        C=rnd(batch, groups, d_state, length),
        D=rnd(channels) if with_d else None,
        delta_bias=rnd(channels) if with_d else None)


SHAPES = [  # batch, groups, per_group, N, L
    (1, 1, 3, 4, 1), (2, 2, 3, 5, 7), (1, 4, 2, 16, 65), (2, 1, 4, 3, 130),
    (3, 2, 2, 1, 49)
]


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('softplus', [True, False])
def test_reference_matches_recurrence(shape, softplus):
    args = random_scan_inputs(*shape)
    for name in ('u', 'delta', 'A', 'B', 'C', 'D', 'delta_bias'):
        args[name].requires_grad_(True)
    y = selective_scan_reference(**args, delta_softplus=softplus)
    expected = recurrence(*args.values(), softplus=softplus)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(y)
    inputs = list(args.values())
    got = torch.autograd.grad(y, inputs, grad_out)
    want = torch.autograd.grad(expected, inputs, grad_out)
    for name, a, b in zip(args, got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


def test_reference_float32_and_optional_args():
    args = random_scan_inputs(2, 2, 4, 16, 100, dtype=torch.float32,
                              with_d=False, seed=1)
    y = selective_scan_reference(**args)
    assert y.dtype == torch.float32
    expected = recurrence(*(v.double() if v is not None else None
                            for v in args.values()))
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)


# measured: 2.7e-4 (float16) and 1.9e-3 (bfloat16)
@pytest.mark.parametrize('dtype,bound', [(torch.float16, 3e-3),
                                         (torch.bfloat16, 2e-2)])
def test_reference_half_inputs_keep_dtype(dtype, bound):
    args = random_scan_inputs(1, 2, 2, 4, 33, dtype=torch.float32, seed=2)
    half = {k: (v.to(dtype) if k in ('u', 'delta', 'B', 'C') else v)
            for k, v in args.items()}
    y = selective_scan(**half, delta_softplus=True)
    assert y.dtype == dtype
    expected = recurrence(*(v.double() for v in half.values()),
                          softplus=True)
    err = (y.double() - expected).norm() / expected.norm()
    assert err < bound


def test_reference_gradcheck():
    args = random_scan_inputs(1, 2, 2, 3, 9, seed=3)
    names = list(args)

    def fn(*values):
        return selective_scan_reference(
            **dict(zip(names, values)), delta_softplus=True)

    inputs = [v.requires_grad_(True) for v in args.values()]
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_reference_of_an_empty_sequence(dtype):
    """L = 0 gives an empty output and zero gradients (the chunk count
    divided by zero); float64 runs on the reference whatever the backend."""
    args = random_scan_inputs(2, 2, 3, 4, 0, dtype=dtype, seed=7)
    inputs = [v.requires_grad_() for v in args.values()]
    with use_backend('reference'):
        y = selective_scan(**args, delta_softplus=True)
    assert y.shape == (2, 6, 0) and y.dtype == dtype
    y.sum().backward()
    assert all(v.grad is not None and not v.grad.any() for v in inputs)


def test_front_door_uses_reference_when_forced():
    args = random_scan_inputs(1, 2, 3, 4, 10, dtype=torch.float32, seed=4)
    with use_backend('reference'), RecordScans() as scans:
        y = selective_scan(**args)
    assert scans.ran == ['reference']
    assert torch.equal(y, selective_scan_reference(**args))
    with pytest.raises(ValueError, match='use_backend'):
        with use_backend('fastest'):
            pass


@pytest.mark.parametrize('H,W', [(3, 5), (4, 4), (1, 6), (7, 2)])
def test_cross_scan_and_merge_against_indices(H, W):
    x = torch.randn(2, 3, H, W)
    ys = cross_scan(x)
    assert ys.shape == (2, 4, 3, H * W)
    row_major = [(h, w) for h in range(H) for w in range(W)]
    col_major = [(h, w) for w in range(W) for h in range(H)]
    orders = [row_major, col_major, row_major[::-1], col_major[::-1]]
    for k, order in enumerate(orders):
        for l, (h, w) in enumerate(order):
            torch.testing.assert_close(ys[:, k, :, l], x[:, :, h, w])

    y = torch.randn(2, 4, 3, H * W)
    merged = cross_merge(y, H, W)
    expected = torch.zeros(2, 3, H * W)
    for k, order in enumerate(orders):
        for l, (h, w) in enumerate(order):
            expected[:, :, h * W + w] += y[:, k, :, l]
    torch.testing.assert_close(merged, expected)


def test_cross_selective_scan_is_the_composition():
    torch.manual_seed(5)
    batch, d_inner, H, W, N, R = 2, 6, 3, 5, 4, 2
    x = torch.randn(batch, d_inner, H, W, dtype=torch.float64)
    x_proj = torch.randn(4, R + 2 * N, d_inner, dtype=torch.float64) * 0.3
    dt_w = torch.randn(4, d_inner, R, dtype=torch.float64) * 0.5
    dt_b = torch.randn(4, d_inner, dtype=torch.float64)
    A_logs = torch.randn(4 * d_inner, N, dtype=torch.float64)
    Ds = torch.randn(4 * d_inner, dtype=torch.float64)
    out = cross_selective_scan(x, x_proj, dt_w, dt_b, A_logs, Ds)

    expected = torch.zeros(batch, d_inner, H * W, dtype=torch.float64)
    flat = x.flatten(2)
    col = x.transpose(2, 3).flatten(2)
    to_row_major = torch.arange(H * W).view(H, W).t().flatten()
    for k, seq in enumerate([flat, col, flat.flip(-1), col.flip(-1)]):
        proj = torch.einsum('cd,bdl->bcl', x_proj[k], seq)
        dt_low, Bk, Ck = proj.split([R, N, N], dim=1)
        delta = torch.einsum('dr,brl->bdl', dt_w[k], dt_low)
        sl = slice(k * d_inner, (k + 1) * d_inner)
        y = recurrence(seq, delta, -torch.exp(A_logs[sl]), Bk[:, None],
                       Ck[:, None], Ds[sl], dt_b[k], softplus=True)
        if k >= 2:
            y = y.flip(-1)
        if k % 2 == 1:
            y = torch.empty_like(y).index_copy_(2, to_row_major, y)
        expected += y
    torch.testing.assert_close(out, expected.view(batch, d_inner, H, W))


def test_cross_selective_scan_float32_under_autocast():
    x = torch.randn(1, 4, 3, 3)
    params = (torch.randn(4, 1 + 2 * 2, 4), torch.randn(4, 4, 1),
              torch.randn(4, 4), torch.randn(16, 2), torch.randn(16))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = cross_selective_scan(x, *params)
    assert out.dtype == torch.float32


def test_cross_selective_scan_channels_last_and_bf16_scan():
    torch.manual_seed(7)
    x = torch.randn(2, 6, 5, 3)
    params = (torch.randn(4, 2 + 2 * 4, 6) * 0.3, torch.randn(4, 6, 2) * 0.5,
              torch.randn(4, 6), torch.randn(24, 4), torch.randn(24))
    first = cross_selective_scan(x, *params)
    last = cross_selective_scan(x.permute(0, 2, 3, 1), *params,
                                channels_last=True)
    torch.testing.assert_close(last, first.permute(0, 2, 3, 1))
    low = cross_selective_scan(x, *params, scan_dtype=torch.bfloat16)
    assert low.dtype == torch.float32
    err = ((low - first).norm() / first.norm()).item()
    # rounded inputs, float32 state; measured 4.8e-3
    assert 0 < err < 3e-2


def test_cross_selective_scan_bad_options():
    x = torch.randn(1, 4, 3, 3)
    params = (torch.randn(4, 1 + 2 * 2, 4), torch.randn(4, 4, 1),
              torch.randn(4, 4), torch.randn(16, 2), torch.randn(16))
    with pytest.raises(ValueError, match='fused=True, but the fused kernel '
                       'cannot run: (scan dtype float64|the fused CPU kernel '
                       'was not built)'):
        cross_selective_scan(x.double(), *params, fused=True)
    with pytest.raises(ValueError, match='scan_dtype must be one of'):
        cross_selective_scan(x, *params, scan_dtype=torch.int8)
    with pytest.raises(ValueError, match='channels_last must be a bool'):
        cross_selective_scan(x, *params, channels_last='yes')
    # 0 is not False: it took the fused kernel
    for fused in (0, 'no'):
        with pytest.raises(ValueError, match=r'fused must be None or a '
                           f'bool, got {fused!r}'):
            cross_selective_scan(x, *params, fused=fused)
    with pytest.raises(ValueError, match=r'x must have shape \(batch, H, W, '
                       r'D\)'):
        cross_selective_scan(x[0], *params, channels_last=True)


DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs a GPU'))]


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('shape', [(0, 6, 5, 3), (2, 6, 0, 3),
                                   (2, 6, 5, 0)])
@pytest.mark.parametrize('channels_last', [False, True])
def test_cross_selective_scan_of_an_empty_map(shape, channels_last, device):
    """An empty batch or map gives an empty output and zero gradients, on
    the unfused path (the fused kernel says why it does not take it)."""
    params = [t.to(device).requires_grad_() for t in (
        torch.randn(4, 2 + 2 * 4, 6), torch.randn(4, 6, 2),
        torch.randn(4, 6), torch.randn(24, 4), torch.randn(24))]
    x = torch.randn(shape, device=device, requires_grad=True)
    x_in = x.permute(0, 2, 3, 1) if channels_last else x
    with RecordScans() as scans:
        y = cross_selective_scan(x_in, *params, channels_last=channels_last)
    assert y.shape == x_in.shape and y.dtype == torch.float32
    assert not any(key.startswith('fused') for key in scans.ran)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for param in params:
        assert param.grad is not None and not param.grad.any()
    with pytest.raises(ValueError, match=r'fused=True, but the fused kernel '
                       r'cannot run: (the map of shape .* is empty|the fused '
                       r'\w+ kernel was not built)'):
        cross_selective_scan(x_in, *params, channels_last=channels_last,
                             fused=True)


@pytest.mark.parametrize('change,match', [
    (dict(u=torch.randn(2, 8)), r'u must have shape \(batch, channels, L\)'),
    (dict(delta=torch.randn(2, 8, 11)), r'delta must have shape'),
    (dict(A=torch.randn(7, 4)), r'A must have shape \(channels, N\) = '
     r'\(8, \*\), got \(7, 4\)'),
    (dict(B=torch.randn(2, 3, 4, 10)), r'B has 3 groups, which must divide'),
    (dict(C=torch.randn(2, 2, 5, 10)), r'C must have shape'),
    (dict(D=torch.randn(9)), r'D must have shape'),
    (dict(delta_bias=torch.randn(8, 1)), r'delta_bias must have shape'),
    (dict(u=torch.randint(0, 3, (2, 8, 10))), r'u must have dtype'),
    (dict(A=torch.randn(8, 4).half()), r'A must have dtype'),
    (dict(B=torch.randn(2, 2, 4, 10).half()), r'B must have dtype'),
    (dict(delta_softplus='no'), r"delta_softplus must be a bool, got 'no'"),
])
def test_selective_scan_bad_input(change, match):
    args = random_scan_inputs(2, 2, 4, 4, 10, dtype=torch.float32, seed=6)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        selective_scan(**args)


def test_cross_ops_bad_input():
    with pytest.raises(ValueError, match=r'x must have shape'):
        cross_scan(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match=r'y must have shape'):
        cross_merge(torch.randn(1, 4, 3, 10), 3, 4)
    # (-3) * (-5) is y's 15 positions, but no map's
    with pytest.raises(ValueError, match=r'H must be >= 0, got -3'):
        cross_merge(torch.randn(1, 4, 3, 15), -3, -5)
    # were reshape's TypeError, and '2' * 3 positions = '222'
    for H in (2.0, '2', True):
        with pytest.raises(ValueError, match=f'H must be an int, got {H!r}'):
            cross_merge(torch.randn(1, 4, 3, 6), H, 3)
    x = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match=r'x_proj_weight must have shape'):
        cross_selective_scan(x, torch.randn(4, 6, 4), torch.randn(4, 4, 1),
                             torch.randn(4, 4), torch.randn(16, 2),
                             torch.randn(16))
