"""The check of tools/setup_env.sh, demo.sh and run_tests.sh: a C++ compiler
is there but mmvmamba._C does not load is an error, unless opted out."""
import pytest

from mmvmamba.ops import _ext


@pytest.fixture
def not_loaded(monkeypatch):
    monkeypatch.setattr(_ext, '_LOADED', False)
    monkeypatch.setattr(_ext, '_STATUS', 'mmvmamba._C is not built (...)')
    for name in ('MMVMAMBA_ALLOW_NO_EXT', 'MMVMAMBA_BUILD_EXT'):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_missing_extension_with_a_compiler_is_an_error(not_loaded, capsys):
    not_loaded.setattr(_ext, 'find_cxx_compiler', lambda: '/usr/bin/g++')
    error = _ext.missing_extension_error()
    assert error.startswith('a C++ compiler is there (/usr/bin/g++) but '
                            'mmvmamba._C is not built')
    assert 'MMVMAMBA_ALLOW_NO_EXT=1' in error
    assert _ext.check_extension('run_tests') == f'[run_tests] stopping: {error}'
    assert capsys.readouterr().out == '[run_tests] mmvmamba._C is not built ' \
        '(...)\n'


@pytest.mark.parametrize('name,value', [('MMVMAMBA_ALLOW_NO_EXT', '1'),
                                        ('MMVMAMBA_BUILD_EXT', '0')])
def test_opting_out(not_loaded, name, value):
    not_loaded.setattr(_ext, 'find_cxx_compiler', lambda: '/usr/bin/g++')
    not_loaded.setenv(name, value)
    assert _ext.missing_extension_error() is None


def test_no_compiler_is_no_error(not_loaded):
    not_loaded.setattr(_ext, 'find_cxx_compiler', lambda: None)
    assert _ext.missing_extension_error() is None


def test_compiler_lookup_follows_cxx(monkeypatch, tmp_path):
    monkeypatch.setenv('CXX', 'no-such-compiler-here -pthread')
    assert _ext.find_cxx_compiler() is None
    fake = tmp_path / 'my-g++'
    fake.write_text('#!/bin/sh\n')
    fake.chmod(0o755)
    monkeypatch.setenv('CXX', f'{fake} -pthread')
    assert _ext.find_cxx_compiler() == str(fake)


def test_loaded_extension_is_no_error():
    if not _ext.ext_status()[0]:
        pytest.skip('mmvmamba._C not loaded here')
    assert _ext.missing_extension_error() is None
