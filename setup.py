"""Build and install mmvmamba.

``pip install --no-deps --no-build-isolation -e .`` (or without ``-e``)
compiles the selective-scan extension ``mmvmamba._C`` from ``csrc/`` against
the environment's torch (pyproject.toml declares the PEP 517 / 660 build, so
any pip >= 21.3 and setuptools >= 77 build it alike, with or without a
package index):

* CUDA + CPU kernels when torch is a CUDA build and ``nvcc`` is found (no GPU
  is needed at build time); ``MMVMAMBA_FORCE_CUDA=1`` makes a missing
  ``nvcc`` an error instead of a fallback;
* CPU kernels only when torch has no CUDA, no ``nvcc`` is found, or
  ``MMVMAMBA_WITH_CUDA=0`` (a quick build, e.g. for CPU-only tests);
* nothing (pure Python, the PyTorch reference runs) with
  ``MMVMAMBA_BUILD_EXT=0`` or when no C++ compiler is found.

When a C++ compiler is there and the build was not turned off, the install
fails (it never falls back to pure Python): if torch cannot be imported (an
isolated build: add ``--no-build-isolation``) or a compile fails. After the
build, a line ``[mmvmamba setup] built mmvmamba._C ...`` says what was built
and where (``pip install -v`` shows it).

C++20 with torch >= 2.14 (its headers need it), C++17 before.
``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (default ``9.0+PTX``);
``MAX_JOBS`` bounds the parallel compile jobs. ``MMVMAMBA_NVCC_FLAGS`` adds
flags to every nvcc command (split on whitespace), e.g.
``MMVMAMBA_NVCC_FLAGS='-Xptxas -v'`` for each kernel's registers and spills.
"""
import glob
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = 'csrc'


def read_version() -> str:
    """Return ``__version__`` from mmvmamba/version.py without importing."""
    scope = {}
    exec((ROOT / 'mmvmamba' / 'version.py').read_text(), scope)
    return scope['__version__']


def read_requirements(name: str) -> list:
    """Return the requirement lines of requirements/<name>."""
    lines = (ROOT / 'requirements' / name).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith('#')]


def say(message: str) -> None:
    print(f'[mmvmamba setup] {message}', file=sys.stderr, flush=True)


def env_flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() not in ('0', 'false',
                                                                  'no', 'off',
                                                                  '')


def have_cxx_compiler() -> bool:
    """Whether the C++ compiler Python's build would use is on PATH."""
    cxx = os.environ.get('CXX') or sysconfig.get_config_var('CXX') or 'c++'
    return shutil.which(cxx.split()[0]) is not None


def locate_cuda_toolkit() -> None:
    """Point CUDA_HOME at the toolkit when nvcc on PATH is a wrapper script.

    torch takes the folder above ``which nvcc`` as CUDA_HOME; a wrapper in
    /usr/local/bin would make it /usr/local, where libcudart is not found.
    """
    nvcc = shutil.which('nvcc')
    if os.environ.get('CUDA_HOME') or os.environ.get('CUDA_PATH') or not nvcc:
        return
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if glob.glob(os.path.join(home, 'lib*', 'libcudart.so*')):
        return
    for candidate in sorted(glob.glob('/usr/local/cuda*'), reverse=True):
        if os.path.exists(os.path.join(candidate, 'bin', 'nvcc')) and glob.glob(
                os.path.join(candidate, 'lib*', 'libcudart.so*')):
            os.environ['CUDA_HOME'] = candidate
            say(f'nvcc on PATH is not inside a CUDA toolkit; using '
                f'CUDA_HOME={candidate}')
            return


def csrc_files(pattern: str) -> list:
    """Paths (relative to the repository) of the files under csrc/ whose
    names match ``pattern``, sorted: a new source file needs no edit here."""
    return sorted(p.relative_to(ROOT).as_posix()
                  for p in (ROOT / CSRC).rglob(pattern))


def extension_modules():
    """Return (ext_modules, cmdclass) for the build, or empty ones.

    Prints one line saying what is to be built and why; the build command
    (:func:`reporting_build_ext`) says what it built.
    """
    if not env_flag('MMVMAMBA_BUILD_EXT', '1'):
        say('MMVMAMBA_BUILD_EXT=0: installing pure Python (no mmvmamba._C); '
            'the selective scan runs on the PyTorch reference.')
        return [], {}
    if not have_cxx_compiler():
        say('no C++ compiler found: installing pure Python (no mmvmamba._C); '
            'the selective scan runs on the PyTorch reference.')
        return [], {}
    want_cuda = env_flag('MMVMAMBA_WITH_CUDA', '1')
    if want_cuda:
        locate_cuda_toolkit()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as error:
        raise SystemExit(
            '[mmvmamba setup] cannot build mmvmamba._C: torch is not '
            f'importable in the build environment ({error}). Install torch, '
            'then build against it with `pip install --no-deps '
            '--no-build-isolation -e .` (an isolated build does not see it); '
            'MMVMAMBA_BUILD_EXT=0 installs pure Python on purpose.') from None

    force_cuda = env_flag('MMVMAMBA_FORCE_CUDA', '0')
    if force_cuda and not want_cuda:
        raise RuntimeError('MMVMAMBA_FORCE_CUDA=1 and MMVMAMBA_WITH_CUDA=0 '
                           'contradict each other: unset one of them.')
    nvcc = cpp_extension.CUDA_HOME and os.path.join(cpp_extension.CUDA_HOME,
                                                    'bin', 'nvcc')
    with_cuda = want_cuda and torch.version.cuda is not None and bool(
        nvcc) and os.path.exists(nvcc)
    if force_cuda and not with_cuda:
        raise RuntimeError(
            'MMVMAMBA_FORCE_CUDA=1 but torch is not a CUDA build '
            f'(torch.version.cuda={torch.version.cuda}) or nvcc was not found '
            f'(CUDA_HOME={cpp_extension.CUDA_HOME}).')

    # torch >= 2.14 headers need C++20; older ones are written for C++17 (and
    # some of their operators misbehave when compiled as C++20).
    release = tuple(int(v) for v in torch.__version__.split('+')[0].split('.')[:2])
    std = '-std=c++20' if release >= (2, 14) else '-std=c++17'
    # Every C++ source under csrc/, and every CUDA one when building CUDA.
    sources = csrc_files('*.cpp')
    cxx_flags = ['-O3', std, '-g0', '-Wno-psabi']
    link_flags = []
    # at::parallel_for is inline: without OpenMP in this build it runs the
    # CPU kernels on one thread (torch's libgomp is the one loaded).
    if torch.backends.openmp.is_available():
        cxx_flags.append('-fopenmp')
        link_flags.append('-fopenmp')
    define_macros = []
    if with_cuda:
        os.environ.setdefault('TORCH_CUDA_ARCH_LIST', '9.0+PTX')
        sources += csrc_files('*.cu')
        define_macros.append(('MMVMAMBA_WITH_CUDA', None))
        nvcc_flags = ['-O3', std, '--use_fast_math', '-lineinfo',
                      '--expt-relaxed-constexpr']
        extra_nvcc = os.environ.get('MMVMAMBA_NVCC_FLAGS', '').split()
        if extra_nvcc:
            nvcc_flags += extra_nvcc
            say(f'MMVMAMBA_NVCC_FLAGS: extra nvcc flags {extra_nvcc}.')
        extension = cpp_extension.CUDAExtension(
            'mmvmamba._C', sources, define_macros=define_macros,
            extra_compile_args={'cxx': cxx_flags, 'nvcc': nvcc_flags},
            extra_link_args=link_flags)
        kernels = 'CPU and CUDA'
        say(f'to build: mmvmamba._C with CPU and CUDA kernels (nvcc {nvcc}, '
            f'TORCH_CUDA_ARCH_LIST={os.environ["TORCH_CUDA_ARCH_LIST"]}).')
    else:
        why = ('MMVMAMBA_WITH_CUDA=0' if not want_cuda else
               'torch is a CPU build' if torch.version.cuda is None else
               'nvcc was not found')
        extension = cpp_extension.CppExtension(
            'mmvmamba._C', sources, define_macros=define_macros,
            extra_compile_args={'cxx': cxx_flags},
            extra_link_args=link_flags)
        kernels = 'CPU'
        say(f'to build: mmvmamba._C with CPU kernels only ({why}).')
    return [extension], {'build_ext': reporting_build_ext(kernels)}


def reporting_build_ext(kernels: str):
    """torch's ``BuildExtension`` (ninja), saying what it built and where.

    A failed compile or link raises (the install fails); so does a build
    that leaves no library behind.
    """
    from torch.utils import cpp_extension
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class ReportingBuildExtension(base):

        def run(self):
            super().run()
            for ext in self.extensions:
                path = self.get_ext_fullpath(ext.name)
                if not os.path.isfile(path):
                    raise RuntimeError(f'building {ext.name} left no {path}')
                say(f'built {ext.name} with {kernels} kernels: {path}')

    return ReportingBuildExtension


ext_modules, cmdclass = extension_modules()

setup(
    name='mmvmamba',
    version=read_version(),
    description='VMamba backbones for OpenMMLab (mmpretrain, mmdet, mmseg)',
    long_description=(ROOT / 'README.md').read_text()
    if (ROOT / 'README.md').exists() else '',
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.9',
    packages=find_packages(exclude=('tests', 'tools', 'configs')),
    include_package_data=False,
    install_requires=read_requirements('runtime.txt'),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
