"""The launcher end to end: files, learning, exact resume after SIGKILL, and config errors."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.conftest import REPO
from tests.helpers import checkpoint_params, read_metrics

STEPS, EVERY = 120, 40
# The tiny preset, shrunk so the whole file runs in well under a minute.
ARGS = ['--config=configs/lm.py:tiny', f'--config.train.steps={STEPS}',
        '--config.train.log_every_steps=10', f'--config.checkpoint.every_steps={EVERY}',
        '--config.train.batch_size=8', '--config.data.seq_len=64', '--config.mesh.data=2',
        '--config.mesh.fsdp=2', '--config.mesh.tensor=2']
TIMING = ('tokens_per_s', 'mfu')


def _launch(workdir, *extra):
  return subprocess.Popen([sys.executable, '-m', 'experiments.run', f'--workdir={workdir}',
                           *ARGS, *extra], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _run(workdir, *extra):
  proc = _launch(workdir, *extra)
  out, err = proc.communicate(timeout=600)
  return proc.returncode, out + err


def _final_params(workdir):
  assert sorted(int(d) for d in os.listdir(workdir / 'checkpoints'))[-1] == STEPS
  return checkpoint_params(workdir, STEPS)


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('reference')
  code, log = _run(workdir)
  assert code == 0, log
  return workdir


def test_run_writes_config_metrics_tensorboard_checkpoints(reference_run):
  with open(reference_run / 'config.json') as f:
    assert json.load(f)['train']['steps'] == STEPS
  records = read_metrics(reference_run)
  assert [r['step'] for r in records] == list(range(10, STEPS + 1, 10))
  for r in records[1:]:
    assert {'loss', 'learning_rate', 'tokens_per_s', 'mfu'} <= set(r)
    assert r['tokens_per_s'] > 0 and 0 < r['mfu'] < 1
  assert os.listdir(reference_run / 'tensorboard')
  assert sorted(os.listdir(reference_run / 'checkpoints')) == ['120', '40', '80']


def test_loss_drops_on_the_embedded_corpus(reference_run):
  losses = [r['loss'] for r in read_metrics(reference_run)]
  assert losses[-1] < 0.5 * losses[0], losses


def test_sigkill_and_resume_is_bitwise_the_uninterrupted_run(reference_run, tmp_path):
  proc = _launch(tmp_path)
  first_save = tmp_path / 'checkpoints' / str(EVERY)
  deadline = time.time() + 300
  while not first_save.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.1)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL, 'the run finished before it could be killed'
  saved = sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints') if s.isdigit())
  assert saved and saved[-1] < STEPS
  code, log = _run(tmp_path)
  assert code == 0, log
  got, want = _final_params(tmp_path), _final_params(reference_run)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]
  assert strip(read_metrics(tmp_path)) == strip(read_metrics(reference_run))


@pytest.mark.parametrize('overrides,message', [
    (['--config.train.stepz=3'], "'stepz'"),
    (['--config.mesh.data=16'], 'needs 64 devices but 8 exist'),
    (['--config.mesh.tensor=8', '--config.mesh.data=1', '--config.mesh.fsdp=1'],
     "(logical 'heads') has size 4, not divisible by mesh axes tensor of size 8"),
])
def test_bad_config_fails_before_compiling_with_a_clear_message(tmp_path, overrides, message):
  code, log = _run(tmp_path, *overrides)
  assert code != 0
  assert message in log, log[-2000:]
  assert not (tmp_path / 'checkpoints').exists()
