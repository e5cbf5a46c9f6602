"""tools/analysis: FLOP counts of configs (get_flops.py) and ERF maps
(erf.py), run in-process on the CPU, on tiny models except the FLOP count of
VMamba-T at 224."""
import os.path as osp

import erf
import get_flops
import numpy as np
import pytest
import torch
from models import build

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def test_get_flops_vmamba_t_matches_both_published_counts(capsys):
    totals = get_flops.main(
        [osp.join(REPO, 'configs', 'vmamba_t_300e_in1k.py')])
    assert totals['paper'] / 1e9 == pytest.approx(4.46, rel=0.02)
    assert totals['later'] / 1e9 == pytest.approx(5.6, rel=0.02)
    out = capsys.readouterr().out
    assert 'paper' in out and 'later' in out and '22.89 M' in out


def test_erf_tool_writes_a_png_with_init_and_trained_maps(
        tmp_path, tiny_classifier_cfg, tiny_config, resnet_config):
    classifier = build(tiny_classifier_cfg, 'mmpretrain')
    ckpt = tmp_path / 'tiny.pth'
    torch.save({'state_dict': classifier.state_dict()}, ckpt)
    out = tmp_path / 'erf.png'
    maps = erf.main([
        tiny_config, resnet_config, '--checkpoint',
        str(ckpt), '-', '--num-images', '2', '--size', '32', '--out',
        str(out)
    ])
    assert [title for title, _ in maps] == [
        'tiny_vmamba (init)', 'tiny_vmamba (trained)', 'resnet18 (init)'
    ]
    for _, field in maps:
        assert field.shape == (32, 32) and field.max() > 0
    assert out.stat().st_size > 1000


@pytest.mark.parametrize('tool, argv, message', [
    (get_flops, ['vmamba-t', '--shape', '0', '224'],
     '--shape H W must be at least 1 each, got 0 224'),
    (erf, ['vmamba-t', '--out', 'x.png', '--num-images', '0'],
     '--num-images must be at least 1, got 0'),
    (erf, ['vmamba-t', '--out', 'x.png', '--size', '0'],
     '--size must be at least 1, got 0'),
    (erf, ['vmamba-t', '--out', 'x.png', '--batch-size', '-1'],
     '--batch-size must be at least 1, got -1'),
])
def test_sizes_below_one_are_refused(tool, argv, message, capsys):
    """No traceback from deep inside and no map of no images: the parser
    names the argument."""
    with pytest.raises(SystemExit):
        tool.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize('argv, message', [
    (['--device', 'cuda:99'], '--device cuda:99: '),
    (['--checkpoint', 'none.pth'], "--checkpoint: no file at 'none.pth'"),
    (['--images', 'none'], "--images must be a folder of images, got 'none'"),
    (['--out', 'erf.txt'], "--out must be a .png file, got 'erf.txt'"),
    (['--out', 'maps.png'], "--out 'maps.png' is a folder"),
])
def test_erf_arguments_are_checked_first(argv, message, tmp_path,
                                         monkeypatch, capsys):
    """A parser error naming the argument, not a traceback after the
    first maps (or a PNG written elsewhere than asked)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'maps.png').mkdir()
    with pytest.raises(SystemExit) as exit_info:
        erf.parse_args(['vmamba-t', '--out', 'erf.png', *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_erf_inputs_that_cannot_be_read(tmp_path, resnet_config):
    """One line naming the file, and no PNG."""
    out = str(tmp_path / 'erf.png')
    args = ['--out', out, '--num-images', '1', '--size', '32']
    with pytest.raises(SystemExit, match="^erf.py: 'nope.py' is neither a "
                       'config file nor one of'):
        erf.main(['nope.py', *args])
    (tmp_path / 'images').mkdir()
    (tmp_path / 'images' / 'a.png').write_text('not an image')
    with pytest.raises(SystemExit,
                       match='^erf.py: .*a.png is not an image that can be '
                       'read$'):
        erf.main([resnet_config, *args, '--images', str(tmp_path / 'images')])
    (tmp_path / 'empty.pth').write_bytes(b'')
    with pytest.raises(SystemExit, match='^erf.py: --checkpoint .*empty.pth '
                       'is not a PyTorch checkpoint'):
        erf.main([resnet_config, *args, '--checkpoint',
                  str(tmp_path / 'empty.pth')])
    assert not osp.exists(out)


def test_get_flops_unknown_config():
    with pytest.raises(SystemExit, match="^get_flops.py: 'vmamba-x' is "
                       'neither a config file nor one of'):
        get_flops.main(['vmamba-x'])


def test_erf_helpers():
    images = erf.synthetic_images(3, 24, seed=1)
    assert images.shape == (3, 3, 24, 24)
    assert images.std().item() == pytest.approx(1, rel=1e-3)
    scaled = erf.log_scale(np.array([[1e-6, 1e-2], [0.5, 1.]]))
    assert scaled.min() == 0 and scaled.max() == 1
    assert scaled[0, 1] == pytest.approx(0.5)
