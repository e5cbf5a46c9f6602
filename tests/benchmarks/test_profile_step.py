"""benchmarks/profile_step.py: the scan kernels by kind, the command line,
and (GPU) a profile of segmented scans."""
import detectors
import profile_step
import pytest
import torch

from mmvmamba.ops import _ext

FUSED = 'void mmvmamba::scan_cuda::{}<mmvmamba::scan_cuda::CrossIo<float>>'


def test_scan_kinds_group_the_scan_kernels():
    kernels = [
        (FUSED.format('scan_bwd_kernel'), 13, 20.0),
        (FUSED.format('scan_bwd_summary_kernel'), 15, 5.0),
        (FUSED.format('scan_fwd_summary_kernel'), 13, 4.5),
        (FUSED.format('scan_fwd_kernel'), 11, 3.5),
        (FUSED.format('scan_fwd_kernel'), 4, 3.0),
        ('mmvmamba::scan_cuda::(anonymous namespace)::scan_carry_kernel', 28,
         1.25),
        ('void mmvmamba::scan_cuda::(anonymous namespace)::n1_bwd_kernel'
         '<float>(mmvmamba::scan_cuda::ScanParams)', 2, 0.5),
        ('void at::native::tensor_kernel_scan_innermost_dim<float>', 3, 9.0),
        ('_layer_norm_bwd_kernel', 38, 2.0),
    ]
    assert profile_step.scan_kinds(kernels) == [
        ('forward summaries', 13, 4.5),
        ('backward summaries', 15, 5.0),
        ('carries between segments', 28, 1.25),
        ('forward, full passes', 15, 6.5),
        ('backward, full passes', 13, 20.0),
        ('N = 1 backward', 2, 0.5),
    ]
    assert profile_step.scan_kinds(kernels[-2:]) == []


@pytest.mark.parametrize('argv, message', [
    (['mask-rcnn-vmamba-t', '--mode', 'train-bf16'], "a detector's --mode"),
    (['upernet-vmamba-t', '--size', '512'], "--size is a classifier's"),
    (['mask-rcnn-vmamba-t', '--amp-dtype', 'float16'],
     '--amp-dtype is for --mode amp'),
    (['vmamba-t', '--mode', 'amp'], "a classifier's --mode"),
    (['vmamba-t', '--amp-dtype', 'float16'], "--amp-dtype is a detector's"),
    (['vmamba-t', '--batch', '0'], '--batch must be at least 1'),
    (['mask-rcnn-vmamba-t', '--top', '0'], '--top must be at least 1'),
])
def test_a_mode_that_does_not_fit_the_model_is_an_error(
        argv, message, capsys):
    with pytest.raises(SystemExit):
        profile_step.parse_args(argv)
    assert message in capsys.readouterr().err


def test_defaults_follow_the_model(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    det = profile_step.parse_args(['mask-rcnn-vmamba-t', '--mode', 'amp'])
    assert (det.detector, det.mode, det.amp_dtype, det.batch,
            det.size) == (True, 'amp', 'bfloat16', 2, None)
    cls = profile_step.parse_args(['vmamba-t'])
    assert (cls.detector, cls.mode, cls.batch, cls.size) == \
        (False, 'train-bf16', 128, 224)


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU error')
def test_needs_a_gpu(capsys):
    with pytest.raises(SystemExit):
        profile_step.parse_args(['vmamba-t'])
    assert 'needs a GPU' in capsys.readouterr().err


class _TinyDetector(torch.nn.Module):
    """What backbone_step reads of a detector: a data preprocessor and a
    backbone returning a tuple of maps."""

    class Backbone(torch.nn.Module):

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return (self.conv(x), )

    def __init__(self):
        super().__init__()
        self.backbone = self.Backbone()

    def data_preprocessor(self, data, training):
        return dict(inputs=data['inputs'])


def test_backbone_step_does_not_accumulate_gradients():
    """Each step starts without gradients, as a training step after the
    optimizer wrapper's zero_grad: the second step's equal the first's."""
    torch.manual_seed(0)
    model = _TinyDetector()
    step = detectors.backbone_step(model, 'fp32',
                                   dict(inputs=torch.randn(2, 3, 8, 8)),
                                   torch.device('cpu'))
    step()
    first = model.backbone.conv.weight.grad.clone()
    step()
    assert torch.equal(model.backbone.conv.weight.grad, first)


def test_backbone_step_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of .*'fp16'"):
        detectors.backbone_step(None, 'fp16', {}, torch.device('cpu'))


@pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.has_cross_kernel('cuda')),
    reason='needs a GPU and the fused CUDA kernel')
def test_profile_of_segmented_scans_names_every_kind(monkeypatch):
    """The kinds' patterns match the kernels' real names: forced segments
    run summaries and carries beside the full passes."""
    monkeypatch.setenv('MMVMAMBA_SCAN_SEGMENT_CHUNKS', '2')
    g = torch.Generator('cuda').manual_seed(0)
    batch, H, W, d_inner, rank, d_state = 2, 24, 20, 64, 4, 16
    u = torch.randn(batch, H * W, d_inner, device='cuda', generator=g)
    x_dbl = torch.randn(batch, H * W, 4, rank + 2 * d_state, device='cuda',
                        generator=g)
    dt_weight = torch.randn(4, d_inner, rank, device='cuda', generator=g)
    dt_bias = torch.full((4, d_inner), -4.0, device='cuda')
    A = -torch.rand(4 * d_inner, d_state, device='cuda', generator=g) - 0.5
    D = torch.ones(4 * d_inner, device='cuda')
    u.requires_grad_()

    def step():
        y = _ext.cross_scan_kernel(u, x_dbl, dt_weight, dt_bias, A, D, H, W)
        y.sum().backward()

    result = profile_step.profile(step, warmup=1)
    kinds = [kind for kind, _, _ in profile_step.scan_kinds(
        result['kernels'])]
    assert kinds == ['forward summaries', 'backward summaries',
                     'carries between segments', 'forward, full passes',
                     'backward, full passes']
