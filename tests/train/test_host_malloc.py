"""The launcher's malloc re-exec: same process and arguments, settings added, user's kept."""

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
print(os.getpid(), sys.argv[1:], *(os.environ.get(k) for k in
      ('MALLOC_ARENA_MAX', 'MALLOC_MMAP_MAX_', 'MALLOC_TRIM_THRESHOLD_')), flush=True)
reexec_under(sys.argv[1])
"""


def _run(setting, **env):
  clean = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}
  out = subprocess.run([sys.executable, '-c', SCRIPT, setting, 'extra'], cwd=REPO, env=dict(
      clean, **env), capture_output=True, text=True, check=True).stdout
  return [line.split(' ', 1) for line in out.splitlines()]


def test_reexec_adds_the_settings_in_the_same_process_and_keeps_the_users():
  (pid, before), (pid_after, after) = _run('keep', MALLOC_ARENA_MAX='4')
  assert pid == pid_after
  assert before == "['keep', 'extra'] 4 None None"
  assert after == "['keep', 'extra'] 4 0 68719476736"


def test_reexec_is_a_noop_when_nothing_is_missing():
  assert len(_run('default')) == 1
  assert len(_run('notrim', MALLOC_TRIM_THRESHOLD_='1', MALLOC_TOP_PAD_='2')) == 1


@pytest.mark.parametrize('platforms,expected', [('cpu', True), ('cuda', False),
                                                ('tpu,cpu', False)])
def test_cpu_only_follows_jax_platforms(monkeypatch, platforms, expected):
  monkeypatch.setenv('JAX_PLATFORMS', platforms)
  assert host_malloc.cpu_only() is expected
