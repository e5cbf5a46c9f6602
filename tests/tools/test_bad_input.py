"""tools/train.py and tools/test.py given what a new user may give them: a
clear message naming the file and what was expected, no traceback, and
nothing written (no work dir) before the inputs are checked."""
import os
import os.path as osp
import runpy
import subprocess
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TRAIN = osp.join(REPO, 'tools', 'train.py')
TEST = osp.join(REPO, 'tools', 'test.py')
COCO = osp.join(REPO, 'configs', 'mask_rcnn_vmamba_t_1x_coco.py')
ADE = osp.join(REPO, 'configs', 'upernet_vmamba_t_512x512_160k_ade20k.py')
DEMO_DET = osp.join(REPO, 'configs', 'demo',
                    'mask_rcnn_vmamba_demo_synthetic.py')


def run_tool(tool, args, cwd, monkeypatch):
    """Run a tool's ``main`` in this process from ``cwd``; return the
    message it exits with."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, 'argv', [tool, *args])
    # as `python tools/x.py` does: the script's folder first on the path
    monkeypatch.syspath_prepend(osp.dirname(tool))
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(tool, run_name='__main__')
    assert isinstance(exit_info.value.code, str), exit_info.value.code
    assert not osp.exists(osp.join(cwd, 'work_dirs'))
    return exit_info.value.code


def test_coco_config_without_coco_says_where_it_goes(tmp_path):
    """The whole command line: one message, no traceback, exit status 1."""
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (REPO, os.environ.get('PYTHONPATH')) if p)
    proc = subprocess.run([sys.executable, TRAIN, COCO], cwd=tmp_path,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert 'Traceback' not in proc.stderr
    assert 'COCO is expected under data/coco in this layout:' in proc.stderr
    assert 'data/coco/annotations/instances_train2017.json' in proc.stderr
    assert '`bash tools/demo.sh` runs on synthetic data' in proc.stderr
    assert 'train_dataloader (CocoDataset): data_root data/coco/ does not ' \
        'exist' in proc.stderr
    assert not os.listdir(tmp_path)


def test_coco_annotations_missing(tmp_path, monkeypatch):
    (tmp_path / 'data' / 'coco' / 'train2017').mkdir(parents=True)
    message = run_tool(TRAIN, [COCO], tmp_path, monkeypatch)
    assert 'train_dataloader (CocoDataset): ann_file data/coco/annotations/' \
        'instances_train2017.json does not exist' in message
    assert 'img data/coco/val2017/ does not exist' in message
    assert 'train2017/ does not exist' not in message
    assert 'val_evaluator: ann_file data/coco/annotations/' \
        'instances_val2017.json does not exist' in message


def test_ade20k_root_missing(tmp_path, monkeypatch):
    message = run_tool(TRAIN, [ADE], tmp_path, monkeypatch)
    assert 'train_dataloader (ADE20KDataset): data_root ' \
        'data/ade/ADEChallengeData2016 does not exist' in message
    assert 'ADE20K is expected under data/ade/ADEChallengeData2016 in this ' \
        'layout:' in message
    # the path the user sets is the one checked and shown
    message = run_tool(TRAIN, [
        ADE, '--cfg-options', 'train_dataloader.dataset.data_root=ade',
        'val_dataloader.dataset.data_root=ade'
    ], tmp_path, monkeypatch)
    assert 'data_root ade does not exist' in message
    assert 'ADE20K is expected under ade in this layout' in message


def test_resume_of_a_missing_file(tmp_path, monkeypatch):
    message = run_tool(TRAIN, [DEMO_DET, '--resume', 'nowhere/epoch_3.pth'],
                       tmp_path, monkeypatch)
    assert message.endswith("--resume: no checkpoint file at "
                            "'nowhere/epoch_3.pth'")
    (tmp_path / 'folder.pth').mkdir()
    message = run_tool(TRAIN, [DEMO_DET, '--resume', 'folder.pth'], tmp_path,
                       monkeypatch)
    assert message.endswith("no checkpoint file at 'folder.pth' (it is a "
                            'folder)')


def test_test_tool_checks_checkpoint_and_data(tmp_path, monkeypatch):
    message = run_tool(TEST, [COCO, 'missing.pth'], tmp_path, monkeypatch)
    assert message.endswith("checkpoint: no checkpoint file at 'missing.pth'")
    (tmp_path / 'model.pth').write_bytes(b'')
    message = run_tool(TEST, [COCO, 'model.pth'], tmp_path, monkeypatch)
    assert 'test_dataloader (CocoDataset): data_root data/coco/ does not ' \
        'exist' in message
    assert 'test_evaluator: ann_file' in message


def test_missing_config(tmp_path, monkeypatch):
    message = run_tool(TRAIN, ['configs/nope.py'], tmp_path, monkeypatch)
    assert message.endswith("config: no file at 'configs/nope.py'")


def test_a_file_that_is_not_a_config(tmp_path, monkeypatch):
    (tmp_path / 'notes.txt').write_text('lr = 0.1\n')
    message = run_tool(TRAIN, ['notes.txt'], tmp_path, monkeypatch)
    assert message.endswith("config: 'notes.txt' is not a config file (one "
                            'of .py, .yml, .yaml, .json)')


@pytest.mark.parametrize('tool', [TRAIN, TEST])
@pytest.mark.parametrize('entry', ['max_epochs', '=3'])
def test_cfg_options_entry_without_key_and_value(tool, entry, tmp_path,
                                                 monkeypatch, capsys):
    """A parser error naming the entry (mmengine's DictAction raised a
    ValueError from inside argparse)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'argv', [
        tool, DEMO_DET, *(['model.pth'] if tool == TEST else []),
        '--cfg-options', 'train_cfg.max_epochs=1', entry
    ])
    monkeypatch.syspath_prepend(osp.dirname(tool))
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(tool, run_name='__main__')
    assert exit_info.value.code == 2
    assert (f'argument --cfg-options: expected KEY=VALUE entries, got '
            f'{entry!r}') in capsys.readouterr().err
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize('hooks, option, message', [
    ('dict()', '--tta', '--tta needs tta_model and tta_pipeline in the '
     'config'),
    ('dict()', '--show-dir', '--show-dir needs default_hooks.visualization '
     'in the config'),
    ("dict(visualization=dict(type='MyHook'))", '--show-dir',
     '--show-dir does not know MyHook'),
])
def test_test_options_the_config_cannot_serve(hooks, option, message,
                                              tmp_path, monkeypatch):
    """One message, not a KeyError's traceback."""
    (tmp_path / 'plain.py').write_text(
        "default_scope = 'mmdet'\n"
        "test_dataloader = dict(dataset=dict(type='CocoDataset'))\n"
        f'default_hooks = {hooks}\n')
    (tmp_path / 'model.pth').write_bytes(b'')
    args = ['plain.py', 'model.pth', option]
    if option == '--show-dir':
        args.append('shown')
    assert message in run_tool(TEST, args, tmp_path, monkeypatch)
