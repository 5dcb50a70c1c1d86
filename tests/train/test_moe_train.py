"""The tiny MoE through the launcher on an expert-parallel mesh: it learns, logs its MoE metrics,
checkpoints, and resuming from the half-way checkpoint ends bitwise where the straight run ends."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np

from tests.conftest import REPO
from tests.helpers import checkpoint_params, read_metrics

STEPS = 20
ARGS = ['--config=configs/moe.py:tiny', '--config.train.log_every_steps=5',
        '--config.train.warmup_steps=5',
        f'--config.checkpoint.every_steps={STEPS // 2}', f'--config.train.decay_steps={STEPS}',
        '--config.train.batch_size=8', '--config.data.seq_len=32', '--config.mesh.data=1',
        '--config.mesh.expert=2']
# Two devices are enough for expert parallelism and compile much faster than eight.
ENV = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')


def _run(workdir, steps):
  proc = subprocess.run([sys.executable, '-m', 'experiments.run', f'--workdir={workdir}',
                         *ARGS, f'--config.train.steps={steps}'], cwd=REPO, env=ENV,
                        capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return read_metrics(workdir)


def test_tiny_moe_learns_logs_expert_metrics_and_resumes_exactly(tmp_path):
  straight = _run(tmp_path / 'straight', STEPS)
  assert straight[-1]['loss'] < 0.7 * straight[0]['loss'], [r['loss'] for r in straight]
  last = straight[-1]
  loads = [last[f'moe_load_e{i:02d}'] for i in range(8)]
  assert abs(sum(loads) - 1.0) < 1e-5 and min(loads) > 0
  assert 0 <= last['moe_dropped'] < 1 and last['moe_aux_loss'] > 0
  # Resume the straight run's half-way checkpoint in a copy that never saw its second half.
  shutil.copytree(tmp_path / 'straight', tmp_path / 'resumed')
  shutil.rmtree(tmp_path / 'resumed' / 'checkpoints' / str(STEPS))
  resumed = _run(tmp_path / 'resumed', STEPS)
  assert [r['step'] for r in resumed] == [5, 10, 15, 20]
  assert resumed[-1]['loss'] == last['loss']
  for a, b in zip(jax.tree.leaves(checkpoint_params(tmp_path / 'resumed', STEPS)),
                  jax.tree.leaves(checkpoint_params(tmp_path / 'straight', STEPS))):
    np.testing.assert_array_equal(a, b)
