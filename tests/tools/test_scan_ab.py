"""The CPU side of ``tools/scan_ab.py``: how ``segments`` groups the
kernels, and what ``profile`` and the GPU subcommands refuse."""

import pytest
import torch

from mmvmamba.ops import _ext


@pytest.fixture(scope='module')
def scan_ab(load_tool):
    return load_tool('scan_ab')


@pytest.mark.parametrize('name, kind', [
    ('void mmvmamba::scan_cuda::scan_fwd_summary_kernel<mmvmamba::scan_cuda::'
     'CrossIo<c10::BFloat16> >(mmvmamba::scan_cuda::ScanParams)', 'summary'),
    ('void mmvmamba::scan_cuda::scan_bwd_summary_kernel<mmvmamba::scan_cuda::'
     'SeqIo<float, 4> >(mmvmamba::scan_cuda::ScanParams)', 'summary'),
    ('mmvmamba::scan_cuda::(anonymous namespace)::scan_carry_kernel('
     'mmvmamba::scan_cuda::ScanParams, bool)', 'carry'),
    ('void mmvmamba::scan_cuda::scan_bwd_kernel<mmvmamba::scan_cuda::'
     'CrossIo<float>, true>(mmvmamba::scan_cuda::ScanParams)', 'full'),
    ('void mmvmamba::scan_cuda::scan_fwd_kernel<mmvmamba::scan_cuda::'
     'CrossIo<float> >(mmvmamba::scan_cuda::ScanParams)', 'full'),
    ('nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_TNN', None),
    ('void at::native::vectorized_elementwise_kernel<4, '
     'at::native::FillFunctor<float>, std::array<char*, 1ul> >', None),
])
def test_kernel_kinds(scan_ab, name, kind):
    assert scan_ab.kernel_kind(name) == kind


@pytest.mark.skipif(not _ext.ext_status()[0], reason='needs mmvmamba._C')
def test_segmented_shapes_are_split_on_an_h200(scan_ab):
    """Each fused case of ``segments`` is split into several segments in
    both passes by the launch code's rule on an H200 (132 SMs; 5 blocks
    of 32 channels an SM forward, 4 backward), so its table shows the
    summaries."""
    from mmvmamba import _C
    for _, batch, C, height, width in scan_ab.SEGMENTED:
        chunks = -(-height * width // 64)
        blocks = batch * 4 * -(-2 * C // 32)
        for wave, backward in ((132 * 5, False), (132 * 4, True)):
            seg = _C.segment_chunks(chunks, blocks, wave, backward, -1)
            assert -(-chunks // seg) > 1, (height, width, backward)


@pytest.mark.parametrize('name, kernel', [
    ('void mmvmamba::scan_cuda::scan_bwd_kernel<mmvmamba::scan_cuda::'
     'CrossIo<c10::BFloat16>, true>(mmvmamba::scan_cuda::ScanParams)',
     'kept decays'),
    ('void mmvmamba::scan_cuda::scan_bwd_kernel<mmvmamba::scan_cuda::'
     'CrossIo<float>, false>(mmvmamba::scan_cuda::ScanParams)',
     'decays recomputed'),
    ('void mmvmamba::scan_cuda::scan_bwd_kernel<mmvmamba::scan_cuda::'
     'SeqIo<float, 4>, true>(mmvmamba::scan_cuda::ScanParams)', None),
    ('void mmvmamba::scan_cuda::scan_bwd_summary_kernel<mmvmamba::scan_cuda'
     '::CrossIo<float> >(mmvmamba::scan_cuda::ScanParams)', None),
    ('void mmvmamba::scan_cuda::scan_fwd_kernel<mmvmamba::scan_cuda::'
     'CrossIo<float>, true>(mmvmamba::scan_cuda::ScanParams)',
     'tensor step sizes'),
    ('void mmvmamba::scan_cuda::scan_fwd_kernel<mmvmamba::scan_cuda::'
     'CrossIo<c10::BFloat16>, false>(mmvmamba::scan_cuda::ScanParams)',
     'FMA step sizes'),
    ('void mmvmamba::scan_cuda::scan_fwd_kernel<mmvmamba::scan_cuda::'
     'SeqIo<float, 4>, false>(mmvmamba::scan_cuda::ScanParams)', None),
    ('void mmvmamba::scan_cuda::scan_fwd_summary_kernel<mmvmamba::scan_cuda'
     '::CrossIo<float> >(mmvmamba::scan_cuda::ScanParams)', None),
])
def test_kernel_variants(scan_ab, name, kernel):
    assert scan_ab.kernel_variant(name) == kernel


@pytest.mark.parametrize('args, message', [
    (['--stage', '4'], '--stage must be 0 .. 3, got 4'),
    (['--stage', '-1'], '--stage must be 0 .. 3, got -1'),
    (['--ranks', '12', '0'], '--ranks must be positive, got [12, 0]'),
])
def test_ranks_arguments(scan_ab, capsys, args, message):
    with pytest.raises(SystemExit):
        scan_ab.main(['ranks'] + args)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize('args, message', [
    (['time', '--batch', '0'], '--batch must be at least 1, got 0'),
    (['time', '--repeat', '0'], '--repeat must be at least 1, got 0'),
    (['ranks', '--repeat', '-1'], '--repeat must be at least 1, got -1'),
    (['profile', '--batch', '0'], '--batch must be at least 1, got 0'),
    (['profile', '--stages', '0', '4'], '--stages must be 0 .. 3, got 0 4'),
    (['segments', '--segment-chunks', '0', '-4'],
     '--segment-chunks must be at least 0, got 0 -4'),
])
def test_sizes_and_counts_are_checked_before_the_gpu(scan_ab, capsys, args,
                                                      message):
    """Parser errors naming the option (were the median of no times or
    an IndexError on the GPU)."""
    with pytest.raises(SystemExit) as exit_info:
        scan_ab.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_compare_needs_files(scan_ab, capsys, tmp_path):
    (tmp_path / 'a.pt').write_bytes(b'')
    with pytest.raises(SystemExit) as exit_info:
        scan_ab.main(['compare', str(tmp_path / 'a.pt'), str(tmp_path),
                      str(tmp_path / 'c.pt')])
    assert exit_info.value.code == 2
    assert f'compare: no file at {tmp_path}, {tmp_path}/c.pt' in \
        capsys.readouterr().err


@pytest.mark.parametrize('size', ['100', '16', '0'])
def test_profile_size_must_be_a_multiple_of_32(scan_ab, capsys, size):
    with pytest.raises(SystemExit):
        scan_ab.main(['profile', '--size', size])
    assert f'--size must be a positive multiple of 32, got {size}' in \
        capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU path')
@pytest.mark.parametrize('mode', ['segments', 'time', 'profile', 'ranks'])
def test_gpu_subcommands_refuse_without_a_gpu(scan_ab, capsys, mode):
    with pytest.raises(SystemExit):
        scan_ab.main([mode])
    assert f'{mode} needs a CUDA GPU' in capsys.readouterr().err


@pytest.mark.skipif(not _ext.ext_status()[0], reason='needs mmvmamba._C')
def test_op_calls_pass_the_inputs_in_the_ops_order(scan_ab):
    """cross_calls / plain_calls (the times' callables), on small CPU
    inputs: the forward is the op's, the backward returns a gradient of
    each input's shape."""
    import mmvmamba.ops._ext  # noqa: F401
    ops = torch.ops.mmvmamba
    g = torch.Generator().manual_seed(0)
    batch, channels, height, width, n = 1, 16, 3, 5, 16
    length = height * width
    cross = dict(
        u=torch.randn(batch, length, channels, generator=g),
        x_dbl=torch.randn(batch, length, 4, 1 + 2 * n, generator=g),
        dt_weight=torch.randn(4, channels, 1, generator=g),
        dt_bias=torch.randn(4, channels, generator=g) - 4,
        A=-torch.rand(4 * channels, n, generator=g) - 0.5,
        D=torch.randn(4 * channels, generator=g))
    fwd, bwd, first = scan_ab.cross_calls(
        cross, torch.randn(batch, length, channels, generator=g),
        (height, width))
    y = ops.cross_scan_fwd(*cross.values(), height, width)[0]
    assert torch.equal(fwd()[0], y) and torch.equal(first[0], y)
    assert [t.shape for t in bwd()] == [t.shape for t in cross.values()]
    plain = dict(
        u=torch.randn(batch, 4 * channels, length, generator=g),
        delta=torch.randn(batch, 4 * channels, length, generator=g),
        A=-torch.rand(4 * channels, n, generator=g) - 0.5,
        B=torch.randn(batch, 4, n, length, generator=g),
        C=torch.randn(batch, 4, n, length, generator=g),
        D=torch.randn(4 * channels, generator=g),
        delta_bias=torch.randn(4 * channels, generator=g))
    fwd, bwd, first = scan_ab.plain_calls(
        plain, torch.randn(batch, 4 * channels, length, generator=g))
    y = ops.selective_scan_fwd(*plain.values(), True)[0]
    assert torch.equal(fwd()[0], y) and torch.equal(first[0], y)
    assert [t.shape for t in bwd()] == [t.shape for t in plain.values()]
