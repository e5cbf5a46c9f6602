"""The install a new user makes builds ``mmvmamba._C``, whatever pip runs it.

A fresh virtualenv holds one of :data:`TOOLCHAINS` (pip and setuptools:
what a Python 3.11 venv ships with setuptools 80.10.2, whose ``setup.py
develop`` hands the work to a second, isolated pip; Ubuntu 24.04's pip with
setuptools 81, as on the project's GPU machines; the newest of both when
this was written), and no package index (``PIP_NO_INDEX=1``); this
environment's torch and mmengine are visible through a ``.pth`` file. A
copy of the checkout installed with ``pip install --no-deps --no-build-isolation -e``,
then without ``-e``, must build the extension (CPU kernels only,
``MMVMAMBA_WITH_CUDA=0``, to keep it short) and load it from outside the
checkout; without torch the install must fail, saying why.

The wheels are downloaded once (PyPI) into ``~/.cache/mmvmamba/
install-test-wheels``; a toolchain's tests are skipped when that cache lacks
its wheels and cannot fill them.
"""
import glob
import json
import os
import os.path as osp
import shutil
import subprocess
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CACHE = osp.join(osp.expanduser('~'), '.cache', 'mmvmamba',
                 'install-test-wheels')
#: The pip and setuptools versions of each fresh venv.
TOOLCHAINS = [
    {'pip': '23.2.1', 'setuptools': '80.10.2'},
    {'pip': '24.0', 'setuptools': '81.0.0'},
    {'pip': '26.3', 'setuptools': '84.2.1'},
]

pytestmark = pytest.mark.slow

# Imported from outside the checkout: where mmvmamba and its extension come
# from, which kernels it has, and one scan through the compiled CPU kernel.
PROBE = """
import json
import torch
import mmvmamba
import mmvmamba._C as C
from mmvmamba.ops._ext import ext_status, selective_scan_kernel
u = torch.randn(1, 2, 5)
y = selective_scan_kernel(u, torch.rand(1, 2, 5), -torch.rand(2, 4),
                          torch.randn(1, 1, 4, 5), torch.randn(1, 1, 4, 5))
print(json.dumps(dict(package=mmvmamba.__file__, library=C.__file__,
                      with_cuda=C.with_cuda, status=ext_status()[1],
                      finite=bool(torch.isfinite(y).all()))))
"""


def cached_wheels(pins):
    """Paths of the wheels of ``pins`` ({name: version}), downloaded if
    absent."""

    def find():
        return {
            name: glob.glob(osp.join(CACHE, f'{name}-{version}-*.whl'))
            for name, version in pins.items()
        }

    found = find()
    if not all(found.values()):
        os.makedirs(CACHE, exist_ok=True)
        specs = [f'{name}=={version}' for name, version in pins.items()]
        proc = subprocess.run([
            sys.executable, '-m', 'pip', 'download', '--no-deps',
            '--only-binary', ':all:', '--dest', CACHE, *specs
        ], capture_output=True, text=True)
        found = find()
        if proc.returncode or not all(found.values()):
            pytest.skip(f'{CACHE} lacks {specs} and pip could not download '
                        f'them: {proc.stderr[-500:]}')
    return {name: paths[0] for name, paths in found.items()}


def clean_env(**extra):
    """The environment of the fresh venv's commands: no pip settings of this
    machine (config files, find-links, constraints), no package index."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(('PIP_', 'PYTHON', 'VIRTUAL_ENV', 'MMVMAMBA_'))
    }
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX='1',
               PIP_DISABLE_PIP_VERSION_CHECK='1', **extra)
    return env


def run(args, cwd, env):
    proc = subprocess.run(args, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=1800)
    return proc.returncode, proc.stdout


def copy_checkout(dst):
    """The checkout's sources, without built or downloaded files."""
    shutil.copytree(
        REPO,
        dst,
        ignore=shutil.ignore_patterns('.git', 'build', 'dist', '*.so',
                                      '*.egg-info', '__pycache__',
                                      '.pytest_cache', 'data', 'work_dirs',
                                      'checkpoints'))


@pytest.fixture(scope='module', params=TOOLCHAINS,
                ids=lambda pins: '-'.join(map(''.join, pins.items())))
def venv(request, tmp_path_factory):
    """A venv with one toolchain's pip and setuptools, nothing else."""
    pins = request.param
    wheels = cached_wheels(pins)
    root = tmp_path_factory.mktemp('install')
    env_dir = root / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip',
                    str(env_dir)], check=True)
    python = str(env_dir / 'bin' / 'python')
    code, out = run([
        python, osp.join(wheels['pip'], 'pip'), 'install', '--no-deps',
        '--find-links', CACHE, *wheels.values()
    ], str(root), clean_env())
    assert code == 0, out
    code, out = run([python, '-m', 'pip', 'list'], str(root), clean_env())
    assert code == 0, out
    for name, version in pins.items():
        assert f'{name} {version}' in ' '.join(out.split()), out
    site = subprocess.check_output(
        [python, '-c', 'import sysconfig; print(sysconfig.get_paths()'
         '["purelib"])'], text=True).strip()
    checkout = str(root / 'checkout')
    copy_checkout(checkout)
    return dict(python=python, site=site, checkout=checkout, root=root)


def expose_dev_packages(site):
    """Make this environment's torch and mmengine importable there."""
    import mmengine
    import torch
    dirs = {
        osp.dirname(osp.dirname(m.__file__))
        for m in (torch, mmengine)
    }
    with open(osp.join(site, 'dev_environment.pth'), 'w') as f:
        f.write('\n'.join(sorted(dirs)) + '\n')


def probe(venv):
    """Run PROBE in the venv, from a folder outside the checkout."""
    outside = venv['root'] / 'elsewhere'
    outside.mkdir(exist_ok=True)
    code, out = run([venv['python'], '-c', PROBE], str(outside), clean_env())
    assert code == 0, out
    return json.loads(out.strip().splitlines()[-1])


def pip_install(venv, *args):
    return run([
        venv['python'], '-m', 'pip', 'install', '-v', '--no-deps',
        '--no-build-isolation', *args
    ], venv['root'], clean_env(MMVMAMBA_WITH_CUDA='0', MAX_JOBS='2'))


def test_install_without_torch_fails_saying_why(venv):
    code, out = pip_install(venv, '-e', venv['checkout'])
    assert code != 0
    assert 'cannot build mmvmamba._C: torch is not importable' in out
    assert not glob.glob(osp.join(venv['checkout'], 'mmvmamba', '_C*.so'))


def test_editable_then_regular_install_build_the_extension(venv):
    expose_dev_packages(venv['site'])
    checkout = venv['checkout']

    code, out = pip_install(venv, '-e', checkout)
    assert code == 0, out[-5000:]
    assert '[mmvmamba setup] built mmvmamba._C with CPU kernels' in out, \
        out[-5000:]
    found = probe(venv)
    assert found['package'] == osp.join(checkout, 'mmvmamba', '__init__.py')
    assert osp.dirname(found['library']) == osp.join(checkout, 'mmvmamba')
    assert found['with_cuda'] == 0 and found['finite'], found
    assert 'mmvmamba._C loaded (CPU kernels' in found['status']

    code, out = run([venv['python'], '-m', 'pip', 'uninstall', '-y',
                     'mmvmamba'], venv['root'], clean_env())
    assert code == 0, out
    for library in glob.glob(osp.join(checkout, 'mmvmamba', '_C*.so')):
        os.remove(library)
    code, out = pip_install(venv, checkout)
    assert code == 0, out[-5000:]
    assert '[mmvmamba setup] built mmvmamba._C with CPU kernels' in out
    found = probe(venv)
    installed = osp.join(venv['site'], 'mmvmamba')
    assert found['package'] == osp.join(installed, '__init__.py')
    assert osp.dirname(found['library']) == installed
    assert found['with_cuda'] == 0 and found['finite'], found
