"""The VMamba2 backbone against a step-by-step reference of the authors'
model, the authors' fixture, and its options, sizes, registries and errors.

The reference below is written from the description of the authors' code
(channels-first, their key names, a Python loop over time per direction,
scan orders and merge by explicit pixel positions) and shares nothing with
``mmvmamba``; it is checked against the fixture's logits, which the
authors' own code produced.
"""
import os.path as osp

import pytest
import torch
import torch.nn.functional as F

from mmvmamba.models import VMamba2, convert_authors_state_dict
from mmvmamba.models.backbones.vmamba2 import SS2DV2, Mlp
from mmvmamba.models.checkpoint import infer_vmamba2_arch

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
FIXTURE = osp.join(ROOT, 'tests', 'data',
                   'vmamba_v2_authors_small_random.pth')
SMALL = dict(embed_dims=16, depths=[1, 1, 2, 1], ssm_ratio=1.0, d_state=1,
             mlp_ratio=4.0)


@pytest.fixture(scope='module')
def fixture():
    return torch.load(FIXTURE, map_location='cpu', weights_only=False)


def fixture_arch(fixture):
    cfg = fixture['config']
    return dict(embed_dims=cfg['dims'], depths=list(cfg['depths']),
                ssm_ratio=cfg['ssm_ratio'], d_state=cfg['ssm_d_state'],
                mlp_ratio=cfg['mlp_ratio'])


# ---------------------------------------------------------------------------
# The reference: the authors' VSSM (v05_noz, ln2d) in plain PyTorch.
# ---------------------------------------------------------------------------
def ref_layer_norm_2d(x, weight, bias, eps=1e-5):
    """LayerNorm over the channels of each pixel of (B, C, H, W)."""
    mean = x.mean(1, keepdim=True)
    var = ((x - mean)**2).mean(1, keepdim=True)
    return ((x - mean) / torch.sqrt(var + eps) * weight[:, None, None] +
            bias[:, None, None])


def ref_linear_2d(x, weight, bias=None):
    """A 1x1 conv with an (out, in) weight on (B, C, H, W)."""
    y = torch.einsum('oc,bchw->bohw', weight.reshape(weight.shape[0], -1), x)
    return y if bias is None else y + bias[:, None, None]


def scan_positions(k, H, W):
    """(h, w) of each step of scan order k: 0 rows (l = h*W + w), 1 columns
    (l = w*H + h), 2 and 3 those reversed."""
    if k % 2 == 0:
        order = [(h, w) for h in range(H) for w in range(W)]
    else:
        order = [(h, w) for w in range(W) for h in range(H)]
    return order[::-1] if k >= 2 else order


def ref_ss2d(x, p):
    """SS2D v05_noz on (B, d, H, W); ``p`` holds the ``op.*`` weights."""
    batch, _, H, W = x.shape
    x = ref_linear_2d(x, p['in_proj.weight'])
    e = x.shape[1]
    x = F.silu(F.conv2d(x, p['conv2d.weight'], padding=1, groups=e))
    rank = p['dt_projs_weight'].shape[2]
    n = p['A_logs'].shape[1]
    out = torch.zeros_like(x)
    for k in range(4):
        pos = scan_positions(k, H, W)
        hs = torch.tensor([h for h, _ in pos])
        ws = torch.tensor([w for _, w in pos])
        u = x[:, :, hs, ws]  # (B, e, L) in scan order
        x_dbl = torch.einsum('re,bel->brl', p['x_proj_weight'][k], u)
        dt_low, b_ssm, c_ssm = x_dbl.split([rank, n, n], dim=1)
        delta = torch.einsum('er,brl->bel', p['dt_projs_weight'][k], dt_low)
        delta = F.softplus(delta + p['dt_projs_bias'][k][:, None])
        A = -torch.exp(p['A_logs'][k * e:(k + 1) * e])  # (e, N)
        D = p['Ds'][k * e:(k + 1) * e]
        h = x.new_zeros(batch, e, n)
        for t in range(len(pos)):
            dt = delta[:, :, t, None]
            h = (torch.exp(dt * A) * h +
                 dt * b_ssm[:, None, :, t] * u[:, :, t, None])
            y = (h * c_ssm[:, None, :, t]).sum(-1) + D * u[:, :, t]
            out[:, :, hs[t], ws[t]] += y
    out = ref_layer_norm_2d(out, p['out_norm.weight'], p['out_norm.bias'])
    return ref_linear_2d(out, p['out_proj.weight'])


def sub(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix)}


def ref_backbone(state, x):
    """The authors' Backbone_VSSM forward: the stage outputs (before their
    downsample), each through ``outnorm{i}`` when present; also the last."""
    conv = lambda x, p: F.conv2d(x, p['weight'], p['bias'], 2, 1)  # noqa
    ln = lambda x, p: ref_layer_norm_2d(x, p['weight'], p['bias'])  # noqa
    x = ln(conv(x, sub(state, 'patch_embed.0.')), sub(state, 'patch_embed.2.'))
    x = F.gelu(x)
    x = ln(conv(x, sub(state, 'patch_embed.5.')), sub(state, 'patch_embed.7.'))
    outs = []
    stage = 0
    while f'layers.{stage}.blocks.0.norm.weight' in state:
        block = 0
        while f'layers.{stage}.blocks.{block}.norm.weight' in state:
            p = sub(state, f'layers.{stage}.blocks.{block}.')
            x = x + ref_ss2d(ln(x, sub(p, 'norm.')), sub(p, 'op.'))
            hidden = ref_linear_2d(ln(x, sub(p, 'norm2.')),
                                   p['mlp.fc1.weight'], p['mlp.fc1.bias'])
            x = x + ref_linear_2d(F.gelu(hidden), p['mlp.fc2.weight'],
                                  p['mlp.fc2.bias'])
            block += 1
        if f'outnorm{stage}.weight' in state:
            outs.append(ln(x, sub(state, f'outnorm{stage}.')))
        down = sub(state, f'layers.{stage}.downsample.')
        if down:
            x = ln(conv(x, sub(down, '1.')), sub(down, '3.'))
        stage += 1
    return outs, x


def ref_classifier(state, x):
    """The authors' VSSM classifier: norm per pixel, mean, linear."""
    _, x = ref_backbone(state, x)
    x = ref_layer_norm_2d(x, state['classifier.norm.weight'],
                          state['classifier.norm.bias']).mean((2, 3))
    head = sub(state, 'classifier.head.')
    return x @ head['weight'].T + head['bias']


def double(state):
    return {k: v.double() for k, v in state.items()}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_reference_reproduces_the_authors_logits(fixture):
    """The reference is the authors' model: it gives their logits."""
    with torch.no_grad():
        logits = ref_classifier(double(fixture['state_dict']),
                                fixture['input'].double())
    assert rel_err(logits, fixture['logits'].double()) < 1e-5


def randomised_ss2d(embed_dims, ssm_ratio, d_state, seed=0):
    """An SS2DV2 whose every parameter matters (float64)."""
    torch.manual_seed(seed)
    ss2d = SS2DV2(embed_dims, d_state=d_state, ssm_ratio=ssm_ratio).double()
    with torch.no_grad():
        ss2d.A_logs.uniform_(-3, 1)
        ss2d.Ds.normal_(0, 0.5)
        ss2d.dt_projs_bias.uniform_(-2, 1)
        ss2d.x_proj_weight.mul_(2)
        ss2d.out_norm.weight.normal_(1, 0.2)
        ss2d.out_norm.bias.normal_(0, 0.1)
        for linear in (ss2d.in_proj, ss2d.out_proj):
            linear.weight.normal_(0, linear.weight.shape[1]**-0.5)
    return ss2d


@pytest.mark.parametrize('d, ratio, n, H, W', [(16, 1.0, 1, 13, 10),
                                               (20, 2.0, 3, 5, 9)])
def test_ss2d_matches_the_step_by_step_reference(d, ratio, n, H, W):
    ss2d = randomised_ss2d(d, ratio, n)
    x = torch.randn(2, d, H, W, dtype=torch.float64)
    params = ss2d.state_dict()
    assert set(params) == {
        'in_proj.weight', 'conv2d.weight', 'x_proj_weight', 'dt_projs_weight',
        'dt_projs_bias', 'A_logs', 'Ds', 'out_norm.weight', 'out_norm.bias',
        'out_proj.weight'
    }
    with torch.no_grad():
        ref = ref_ss2d(x, params)
        out = ss2d(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        out32 = ss2d.float()(x.float().permute(0, 2, 3, 1)).permute(
            0, 3, 1, 2)
    assert rel_err(out, ref) < 1e-12  # measured 5e-16
    assert out32.dtype == torch.float32
    assert rel_err(out32.double(), ref) < 5e-6  # measured 4e-7


def test_converted_fixture_fits_vmamba2_exactly(fixture):
    backbone, head = convert_authors_state_dict(fixture['state_dict'])
    arch = infer_vmamba2_arch(backbone)
    assert arch == fixture_arch(fixture)
    model = VMamba2(arch, out_indices=(3, ))
    model.load_state_dict(backbone, strict=True)
    assert head['weight'].shape == (fixture['config']['num_classes'], 256)


def test_non_square_outputs_match_the_reference(fixture):
    """All four outputs (before each downsample, own norms) and the
    classifier's final map, on a non-square image, in float64."""
    state = dict(fixture['state_dict'])
    torch.manual_seed(0)
    for i, width in enumerate([32, 64, 128]):
        state[f'outnorm{i}.weight'] = 1 + 0.2 * torch.randn(width)
        state[f'outnorm{i}.bias'] = 0.1 * torch.randn(width)
    state['outnorm3.weight'] = state['classifier.norm.weight']
    state['outnorm3.bias'] = state['classifier.norm.bias']
    model_state = {k: v for k, v in state.items()
                   if not k.startswith('classifier.')}
    backbone, head = convert_authors_state_dict(model_state)
    assert not head
    model = VMamba2(fixture_arch(fixture), out_indices=(0, 1, 2, 3))
    model.load_state_dict(backbone, strict=True)
    model = model.double().eval()
    x = torch.randn(2, 3, 70, 45, dtype=torch.float64)
    with torch.no_grad():
        outs = model(x)
        ref_outs, _ = ref_backbone(double(state), x)
    assert [o.shape[2:] for o in outs] == [(18, 12), (9, 6), (5, 3), (3, 2)]
    for out, ref in zip(outs, ref_outs):
        assert rel_err(out, ref) < 1e-10


def test_non_square_classifier_matches_the_reference(fixture):
    from mmpretrain.registry import MODELS as CLS_MODELS
    backbone, head = convert_authors_state_dict(fixture['state_dict'])
    classifier = CLS_MODELS.build(
        dict(
            type='ImageClassifier',
            _scope_='mmpretrain',  # whatever scope earlier tests left
            backbone=dict(type='VMamba2', arch=fixture_arch(fixture)),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=10,
                      in_channels=256)))
    state = {f'backbone.{k}': v for k, v in backbone.items()}
    state.update({f'head.fc.{k}': v for k, v in head.items()})
    classifier.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 57, 90)
    with torch.no_grad():
        logits = classifier.eval()(x, mode='tensor')
        ref = ref_classifier(double(fixture['state_dict']), x.double())
    assert rel_err(logits.double(), ref) < 1e-5


# ---------------------------------------------------------------------------
# Sizes, parameters, options.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('arch, params, backbone_params', [
    ('tiny', 30_249_064, 29_481_408),
    ('small', 50_147_752, 49_380_096),
    ('base', 88_557_800, 87_534_592),
])
def test_parameter_counts_equal_the_authors(arch, params, backbone_params):
    with torch.device('meta'):
        cls = VMamba2(arch, out_indices=(3, ))
        det = VMamba2(arch, out_indices=(0, 1, 2, 3))
    width = cls.num_features[-1]
    head = width * 1000 + 1000
    assert sum(p.numel() for p in cls.parameters()) + head == params
    assert sum(p.numel() for p in det.parameters()) == backbone_params


def test_arch_names_and_dict():
    tiny = VMamba2.arch_zoo['tiny']
    assert VMamba2.arch_zoo['t'] == tiny
    assert tiny == dict(embed_dims=96, depths=[2, 2, 8, 2], ssm_ratio=1.0,
                        d_state=1, mlp_ratio=4.0)
    assert VMamba2.arch_zoo['s']['depths'] == [2, 2, 15, 2]
    assert VMamba2.arch_zoo['b']['embed_dims'] == 128
    model = VMamba2('T', out_indices=(0, 1, 2, 3))
    ss2d = model.stages[3].blocks[1].ss2d
    # dt rank from the block width (768 / 16), not from d_inner
    assert ss2d.dt_projs_weight.shape == (4, 768, 48)
    assert ss2d.x_proj_weight.shape == (4, 48 + 2, 768)
    assert ss2d.A_logs.shape == (4 * 768, 1)
    model = VMamba2(dict(SMALL, ssm_ratio=2.0, d_state=2, mlp_ratio=2.0,
                         dt_rank=3))
    block = model.stages[1].blocks[0]
    assert block.ss2d.in_proj.weight.shape == (64, 32)
    assert block.ss2d.dt_projs_weight.shape == (4, 64, 3)
    assert block.ss2d.A_logs.shape == (4 * 64, 2)
    assert block.mlp.fc1.weight.shape == (64, 32)


def test_layout_and_initialisation():
    model = VMamba2('tiny', out_indices=(0, 1, 2, 3))
    keys = model.state_dict().keys()
    block = 'stages.0.blocks.0.'
    for name in ('norm.weight', 'ss2d.in_proj.weight', 'ss2d.conv2d.weight',
                 'ss2d.out_norm.bias', 'norm2.weight', 'mlp.fc2.bias'):
        assert block + name in keys
    # no bias in SS2D's layers (and no gate: in_proj gives d_inner)
    for name in ('ss2d.in_proj.bias', 'ss2d.conv2d.bias',
                 'ss2d.out_proj.bias'):
        assert block + name not in keys
    assert 'stages.2.downsample.conv.weight' in keys
    assert 'stages.3.downsample.conv.weight' not in keys
    assert model.patch_embed.conv1.weight.shape == (48, 3, 3, 3)
    assert model.patch_embed.conv2.weight.shape == (96, 48, 3, 3)
    assert model.stages[0].downsample.conv.weight.shape == (192, 96, 3, 3)
    ss2d = model.stages[0].blocks[0].ss2d
    assert torch.all(ss2d.A_logs == 0) and torch.all(ss2d.Ds == 1)
    dt = F.softplus(ss2d.dt_projs_bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    assert abs(ss2d.in_proj.weight.std().item() - 0.02) < 2e-3
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert all(m.eps == 1e-5 for m in norms)
    assert all(torch.all(m.weight == 1) for m in norms)


@pytest.mark.parametrize('size, expected', [
    ((64, 64), [(16, 16), (8, 8), (4, 4), (2, 2)]),
    ((100, 60), [(25, 15), (13, 8), (7, 4), (4, 2)]),
    ((200, 328), [(50, 82), (25, 41), (13, 21), (7, 11)]),
    ((3, 5), [(1, 2), (1, 1), (1, 1), (1, 1)]),
])
def test_output_shapes_any_size(size, expected):
    model = VMamba2(SMALL, out_indices=(0, 1, 2, 3)).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    assert [o.shape[2:] for o in outs] == expected
    assert [o.shape[1] for o in outs] == [16, 32, 64, 128]
    assert all(o.is_contiguous() for o in outs)


def test_last_row_and_column_are_seen():
    model = VMamba2(SMALL, out_indices=(0, )).eval()
    x = torch.randn(1, 3, 10, 7)
    y = x.clone()
    y[..., 9, 6] += 1.0
    with torch.no_grad():
        a, b = model(x)[0], model(y)[0]
    assert a.shape[2:] == (3, 2)
    assert not torch.allclose(a[..., 2, 1], b[..., 2, 1])


def test_drop_path_rates_are_linear():
    model = VMamba2('tiny')
    rates = [b.drop_path.drop_prob for s in model.stages for b in s.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.2, 14).tolist())


@pytest.mark.parametrize('frozen_stages', [-1, 0, 2, 4])
def test_frozen_stages(frozen_stages):
    model = VMamba2(SMALL, out_indices=(0, 1, 2, 3),
                    frozen_stages=frozen_stages, drop_path_rate=0.)
    model.train()
    frozen = [] if frozen_stages < 0 else [model.patch_embed]
    for i in range(max(frozen_stages, 0)):
        frozen += [model.stages[i], getattr(model, f'norm{i}')]
    frozen_ids = {id(p) for m in frozen for p in m.parameters()}
    for module in frozen:
        assert not module.training
    for name, param in model.named_parameters():
        assert param.requires_grad == (id(param) not in frozen_ids), name
    if frozen_stages in (0, 2):
        loss = sum((o * torch.randn_like(o)).sum()
                   for o in model(torch.randn(1, 3, 32, 32)))
        loss.backward()
        assert model.patch_embed.conv1.weight.grad is None
        last_frozen = model.stages[frozen_stages - 1] if frozen_stages else \
            None
        if last_frozen is not None:
            assert last_frozen.downsample.conv.weight.grad is None
        assert model.stages[frozen_stages].blocks[0].ss2d.A_logs.grad \
            is not None


def test_norm_eval_keeps_batch_norms_in_eval():
    model = VMamba2(SMALL, norm_eval=True)
    model.extra_bn = torch.nn.BatchNorm2d(4)
    model.train()
    assert not model.extra_bn.training
    assert model.stages[0].training
    model = VMamba2(SMALL)
    model.extra_bn = torch.nn.BatchNorm2d(4)
    assert model.train().extra_bn.training


def test_with_cp_same_outputs_and_grads_with_drop_path():
    plain = VMamba2(SMALL, out_indices=(1, 3), drop_path_rate=0.3)
    ckpt = VMamba2(SMALL, out_indices=(1, 3), drop_path_rate=0.3,
                   with_cp=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 24, 20)
    weights = None
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(3)
        outs = model.train()(x)
        if weights is None:
            weights = [torch.randn_like(o) for o in outs]
        loss = sum((o * w).sum() for o, w in zip(outs, weights))
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((outs, grads))
    for a, b in zip(results[0][0] + results[0][1],
                    results[1][0] + results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # drop path is on: another seed gives other outputs
    torch.manual_seed(4)
    assert not torch.allclose(plain(x)[1], results[0][0][1])


def test_with_cp_saves_memory_for_backward():
    """Fewer tensors are kept for the backward with checkpointing."""
    def saved_bytes(model):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        x = torch.randn(2, 3, 64, 64, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return total

    plain = VMamba2(SMALL, drop_path_rate=0.)
    ckpt = VMamba2(SMALL, drop_path_rate=0., with_cp=True)
    assert saved_bytes(ckpt) < 0.5 * saved_bytes(plain)


@pytest.mark.parametrize('kwargs, match', [
    (dict(arch='huge'), r'arch must be one of'),
    (dict(arch=dict(embed_dims=8, depths=[1, 1, 1, 1])),
     r"missing \['ssm_ratio', 'd_state', 'mlp_ratio'\]"),
    (dict(arch=dict(SMALL, heads=3)), r"unknown \['heads'\]"),
    (dict(out_indices=(4, )), r'out_indices must lie in \[0, 4\)'),
    (dict(out_indices=(-5, )), r'out_indices must lie in .*, got -5'),
    (dict(out_indices=[1, 1]), r'out_indices must name each stage once'),
    (dict(frozen_stages=5), r'frozen_stages must be an int in \[-1, 4\]'),
    (dict(scan_dtype='float16'), r'scan_dtype must be one of'),
    (dict(arch=dict(SMALL, mlp_ratio=-1.0)),
     r"arch\['mlp_ratio'\] must be 0 \(no MLP\) or a number giving at "
     r'least one hidden channel \(int\(mlp_ratio \* 16\) >= 1\), got -1.0'),
    # an MLP of no hidden channel (fc2's bias alone), and OverflowError
    (dict(arch=dict(SMALL, mlp_ratio=0.05)),
     r"arch\['mlp_ratio'\] must be 0 .*, got 0.05"),
    (dict(arch=dict(SMALL, mlp_ratio=float('inf'))),
     r"arch\['mlp_ratio'\] must be 0 .*, got inf"),
    (dict(arch=dict(SMALL, ssm_ratio=float('nan'))),
     r"arch\['ssm_ratio'\] must be a number giving .*, got nan"),
    (dict(arch=dict(SMALL, depths=[1, 0, 1, 1])), r"arch\['depths'\]"),
    (dict(arch=dict(SMALL, d_state=0)), r"arch\['d_state'\]"),
    (dict(drop_path_rate=1.5), r'drop_path_rate must be a number in'),
    (dict(recompute_norm=None), r'recompute_norm must be a bool, got None'),
    (dict(recompute_mlp='yes'), r'recompute_mlp must be a bool'),
    (dict(out_indices=[]), r'out_indices must be a stage index or a '
     r'non-empty sequence'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VMamba2(**kwargs)


def test_bad_input():
    model = VMamba2(SMALL)
    with pytest.raises(ValueError, match=r'x must have shape \(batch, '
                       r'in_channels, H, W\) = \(\*, 3, \*, \*\), got '
                       r'\(1, 4, 8, 8\)'):
        model(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match='x must have shape'):
        model(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match='x must have dtype in .*got uint8'):
        model(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


# ---------------------------------------------------------------------------
# Pretrained weights through init_cfg.
# ---------------------------------------------------------------------------
def test_init_cfg_loads_the_authors_raw_checkpoint_strictly(fixture, tmp_path):
    path = str(tmp_path / 'authors.pth')
    # legacy (out, in, 1, 1) Linear2d weights load too
    state = {k: (v[..., None, None] if k.endswith(('in_proj.weight',
                                                   'fc1.weight')) else v)
             for k, v in fixture['state_dict'].items()}
    torch.save(dict(model=state), path)
    model = VMamba2(fixture_arch(fixture), out_indices=(0, 3),
                    init_cfg=dict(type='Pretrained', checkpoint=path))
    fresh_norm0 = model.norm0.weight.clone()
    model.init_weights()
    weights = fixture['state_dict']
    torch.testing.assert_close(model.stages[2].blocks[1].ss2d.A_logs,
                               weights['layers.2.blocks.1.op.A_logs'])
    torch.testing.assert_close(model.stages[0].blocks[0].mlp.fc1.weight,
                               weights['layers.0.blocks.0.mlp.fc1.weight'])
    torch.testing.assert_close(model.norm3.bias,
                               weights['classifier.norm.bias'])
    torch.testing.assert_close(model.norm0.weight, fresh_norm0)


def test_init_cfg_mismatch_names_keys_and_shapes(fixture, tmp_path):
    path = str(tmp_path / 'authors.pth')
    torch.save(dict(model=fixture['state_dict']), path)
    deeper = VMamba2(dict(fixture_arch(fixture), depths=[1, 1, 3, 1]),
                     init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(RuntimeError,
                       match=r"missing keys: \['stages\.2\.blocks\.2\."):
        deeper.init_weights()
    wider = VMamba2(dict(fixture_arch(fixture), ssm_ratio=2.0),
                    init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(RuntimeError, match=r'stages\.0\.blocks\.0\.ss2d\.'
                       r'in_proj\.weight: checkpoint \(32, 32\), model '
                       r'\(64, 32\)'):
        wider.init_weights()


# ---------------------------------------------------------------------------
# bf16 autocast and torch.compile (CPU); the fused CUDA path on a GPU.
# ---------------------------------------------------------------------------
def test_bfloat16_autocast_forward_and_backward():
    torch.manual_seed(0)
    model = VMamba2(SMALL, out_indices=(0, 3), drop_path_rate=0.)
    x = torch.randn(2, 3, 40, 56)
    ref = model(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        outs = model(x)
        loss = sum((o.float() * torch.randn_like(o.float())).sum()
                   for o in outs)
    loss.backward()
    for out, r in zip(outs, ref):
        assert rel_err(out.float(), r) < 4e-2  # measured 1e-2
        assert out.shape == r.shape
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters())


@pytest.mark.parametrize('case', [
    'float32', 'autocast', 'half', 'half-autocast', 'frozen-fc1',
    'frozen-fc2', 'frozen-fc1-autocast', 'frozen-input', 'frozen-input-fc1',
    'rows', 'tokens', 'strided', 'strided-autocast', 'compiled',
    'compiled-autocast'
])
def test_recomputed_mlp_equals_the_plain_graph_bitwise(case):
    """fc2(GELU(fc1(x))) by RecomputedMlp and by autograd: the same output
    and gradients (input, both weights and biases), bit for bit, in their
    dtypes; odd widths, 2-D to 4-D and strided inputs."""
    torch.manual_seed(0)
    frozen = case.split('-')[1:] if case.startswith('frozen') else []
    dtype = torch.bfloat16 if 'half' in case else torch.float32
    autocast = 'autocast' in case
    shape = {'rows': (11, 13), 'tokens': (3, 7, 13)}.get(case, (2, 5, 7, 13))
    x = torch.randn(*shape, dtype=dtype)
    if 'strided' in case:  # a channels-last view of a channels-first map
        x = torch.randn(2, 13, 5, 7, dtype=dtype).permute(0, 2, 3, 1)
    plain = Mlp(13, 37, recompute=False).to(dtype)
    lean = Mlp(13, 37).to(dtype)
    assert lean.recompute  # the default
    for param in plain.parameters():
        torch.nn.init.normal_(param)
    lean.load_state_dict(plain.state_dict())
    for model in (plain, lean):
        for name in ('fc1', 'fc2'):
            getattr(model, name).requires_grad_(name not in frozen)
    run = lean
    if 'compiled' in case:
        torch._dynamo.reset()
        run = torch.compile(lean, fullgraph=True, backend='aot_eager')
    grad = torch.randn(*x.shape[:-1], 13)
    results = []
    for model, forward in ((plain, plain), (lean, run)):
        inputs = x.detach().requires_grad_('input' not in frozen)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            out = forward(inputs)
        wrt = [t for t in (inputs, *model.parameters()) if t.requires_grad]
        results.append((out, torch.autograd.grad(out, wrt,
                                                 grad.to(out.dtype))))
    (out, grads), (out_lean, grads_lean) = results
    expected = 5 - 2 * ('fc1' in frozen) - 2 * ('fc2' in frozen) - (
        'input' in frozen)
    assert len(grads) == len(grads_lean) == expected
    for a, b in zip((out, *grads), (out_lean, *grads_lean)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    with torch.no_grad():  # nothing to recompute for: the plain graph
        assert torch.equal(plain(x), lean(x))


@pytest.mark.parametrize('recompute', [False, True])
def test_torch_compile_fullgraph_matches_eager(recompute):
    """Outputs and parameter gradients (the fused scan's and the
    recomputing Functions' backwards traced too)."""
    torch._dynamo.reset()
    model = VMamba2(SMALL, out_indices=(0, 1, 2, 3), drop_path_rate=0.,
                    recompute_norm=recompute, recompute_mlp=recompute)
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    x = torch.randn(2, 3, 37, 53)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(2, 16 * 2**i, *size, generator=g) for i, size in
               enumerate([(10, 14), (5, 7), (3, 4), (2, 2)])]
    results = []
    for run in (model, compiled):
        outs = run(x)
        loss = sum((o * w).sum() for o, w in zip(outs, weights))
        results.append((outs, torch.autograd.grad(loss,
                                                  list(model.parameters()))))
    for a, b in zip([*results[0][0], *results[0][1]],
                    [*results[1][0], *results[1][1]]):
        torch.testing.assert_close(b, a)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')


@gpu
def test_gpu_tiny_matches_float64_reference_with_gradients(monkeypatch):
    """VMamba2-T on the GPU (the fused path when built) against itself in
    float64 on the CPU reference, values and every gradient."""
    from torch.backends import cudnn
    monkeypatch.setattr(cudnn, 'allow_tf32', False)
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)
    torch.manual_seed(0)
    model = VMamba2('tiny', out_indices=(0, 1, 2, 3), drop_path_rate=0.)
    ref = VMamba2('tiny', out_indices=(0, 1, 2, 3),
                  drop_path_rate=0.).double()
    ref.load_state_dict(model.state_dict())
    model = model.cuda()
    x = torch.randn(2, 3, 163, 227)
    outs = model(x.cuda())
    weights = [torch.randn_like(o, dtype=torch.float64) for o in outs]

    def grads(outs, model):
        loss = sum((o * w.to(o)).sum() for o, w in zip(outs, weights))
        return torch.autograd.grad(loss, list(model.parameters()))

    gpu_grads = grads(outs, model)
    monkeypatch.setenv('MMVMAMBA_SCAN_BACKEND', 'reference')
    ref_outs = ref(x.double())
    ref_grads = grads(ref_outs, ref)
    for a, b in zip(outs, ref_outs):
        assert rel_err(a.double().cpu(), b) < 1e-5
    for a, b in zip(gpu_grads, ref_grads):
        assert ((a.double().cpu() - b).norm() / b.norm()).item() < 1e-4


@gpu
@pytest.mark.parametrize('scan_dtype', ['float32', 'bfloat16'])
def test_gpu_compiled_bf16_autocast_training_step(scan_dtype):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = VMamba2('tiny', out_indices=(0, 1, 2, 3),
                    scan_dtype=scan_dtype).cuda()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 224, 224, device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16):
        eager = model.eval()(x)
        outs = compiled.eval()(x)
    for a, b in zip(outs, eager):
        assert rel_err(a.float(), b.float()) < 5e-2
    compiled.train()
    with torch.autocast('cuda', dtype=torch.bfloat16):
        loss = sum(o.float().square().mean() for o in compiled(x))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters()
               if p.grad is not None)


def test_dt_rank_is_ceil_of_block_width():
    with torch.device('meta'):
        base = VMamba2('base')
    ranks = [s.blocks[0].ss2d.dt_rank for s in base.stages]
    assert ranks == [8, 16, 32, 64]
