"""The launcher's malloc re-exec: same process and arguments, settings added, user's kept."""

import ctypes.util
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from train import host_malloc

# Prints pid, argv and the malloc variables, then re-executes under the setting in argv[1].
SCRIPT = """
import os, sys
from train.host_malloc import reexec_under
tcmalloc = any('libtcmalloc' in line for line in open('/proc/self/maps'))
print(os.getpid(), sys.argv[1:], *(os.environ.get(k) for k in
      ('MALLOC_ARENA_MAX', 'MALLOC_MMAP_MAX_', 'MALLOC_TRIM_THRESHOLD_')), tcmalloc, flush=True)
reexec_under(sys.argv[1])
"""
TCMALLOC_INSTALLED = ctypes.util.find_library('tcmalloc_minimal') == host_malloc.TCMALLOC


def _run(setting, **env):
  clean = {k: v for k, v in os.environ.items()
           if not k.startswith(('MALLOC_', 'TCMALLOC_', 'LD_PRELOAD'))}
  out = subprocess.run([sys.executable, '-c', SCRIPT, setting, 'extra'], cwd=REPO, env=dict(
      clean, **env), capture_output=True, text=True, check=True).stdout
  return [line.split(' ', 1) for line in out.splitlines()]


def test_reexec_adds_the_settings_in_the_same_process_and_keeps_the_users():
  (pid, before), (pid_after, after) = _run('keep', MALLOC_ARENA_MAX='4')
  assert pid == pid_after
  assert before == "['keep', 'extra'] 4 None None False"
  assert after == "['keep', 'extra'] 4 0 68719476736 False"


def test_reexec_is_a_noop_when_nothing_is_missing():
  assert len(_run('default')) == 1
  assert len(_run('notrim', MALLOC_TRIM_THRESHOLD_='1', MALLOC_TOP_PAD_='2')) == 1


@pytest.mark.skipif(not TCMALLOC_INSTALLED, reason='libtcmalloc-minimal4 is not installed')
def test_reexec_under_tcmalloc_loads_it():
  (pid, before), (pid_after, after) = _run('tcmalloc')
  assert pid == pid_after
  assert before.endswith('False') and after.endswith('True')


@pytest.mark.parametrize('installed,auto', [(True, 'tcmalloc'), (False, 'keep')])
def test_auto_is_tcmalloc_where_installed(monkeypatch, installed, auto):
  monkeypatch.setattr(ctypes.util, 'find_library',
                      lambda name: host_malloc.TCMALLOC if installed else None)
  assert host_malloc.resolve('auto') == auto
  assert host_malloc.resolve('keep') == 'keep'
  if not installed:
    with pytest.raises(ValueError, match='apt install libtcmalloc-minimal4'):
      host_malloc.resolve('tcmalloc')
  with pytest.raises(ValueError, match="'jemalloc'"):
    host_malloc.resolve('jemalloc')


@pytest.mark.parametrize('platforms,expected', [('cpu', True), ('cuda', False),
                                                ('tpu,cpu', False)])
def test_cpu_only_follows_jax_platforms(monkeypatch, platforms, expected):
  monkeypatch.setenv('JAX_PLATFORMS', platforms)
  assert host_malloc.cpu_only() is expected
