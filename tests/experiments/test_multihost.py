"""Two real processes on 127.0.0.1 (CPU, gloo collectives) train like one process.

Each process has 4 fake CPU devices; together they form one 8-device global mesh whose 'data'
axis spans the hosts. The worker (this file run as a script) trains the tiny decoder on fixed
global batches, so the two-process job and the single-process job see the same data. The
launcher itself runs as two processes too: logging from process 0 only, checkpoints written by
both, and a stopped job that resumes exactly.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.helpers import checkpoint_params, read_metrics

# Not tests.conftest.REPO: importing conftest in a worker would force 8 devices per process.
REPO = pathlib.Path(__file__).resolve().parents[2]

STEPS = 3
MESH = dict(data=2, fsdp=2, tensor=2)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(local_devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={local_devices}'
  return env


def _worker(out: str, num_processes: int, process_id: int, port: int) -> None:
  """Trains STEPS steps on the global mesh; process 0 saves final params and losses to `out`."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  from tests.helpers import packed_batch, tiny_config
  from train.distributed import maybe_initialize
  from train.trainer import Experiment

  if num_processes > 1:
    maybe_initialize(f'127.0.0.1:{port}', num_processes, process_id)
  config = tiny_config()
  config.mesh.update(**MESH)
  exp = Experiment.from_config(config)
  state, shardings = exp.partitioner.init(exp.init_state, jax.random.key(config.seed))
  step = exp.jit_train_step(shardings)
  sharding = exp.partitioner.batch_sharding
  losses = []
  for i in range(STEPS):
    host = jax.device_get(packed_batch(config.train.batch_size, config.data.seq_len,
                                       config.model.vocab_size, seed=i))
    batch = {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
             for k, v in host.items()}
    state, metrics = step(state, batch)
    total, count = metrics['loss']
    losses.append(float(np.asarray(total)) / float(np.asarray(count)))
  params = multihost_utils.process_allgather(state.params, tiled=True)
  if jax.process_index() == 0:
    flat = {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(out, losses=np.array(losses), **flat)
    with open(out + '.json', 'w') as f:
      json.dump({'processes': jax.process_count(), 'devices': jax.device_count(),
                 'mesh': dict(exp.partitioner.mesh.shape)}, f)


def _spawn(out, num_processes, process_id, port, local_devices):
  return subprocess.Popen(
      [sys.executable, __file__, str(out), str(num_processes), str(process_id), str(port)],
      cwd=REPO, env=_env(local_devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)


def _wait(procs) -> list[str]:
  """Each process's output, once all have exited 0."""
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Single-process (8 devices) and two-process (2 x 4 devices) runs, started together."""
  d = tmp_path_factory.mktemp('multihost')
  port = _free_port()
  procs = [_spawn(d / 'single.npz', 1, 0, 0, 8)]
  procs += [_spawn(d / 'multi.npz', 2, i, port, 4) for i in range(2)]
  _wait(procs)
  return np.load(d / 'single.npz'), np.load(d / 'multi.npz'), d


def test_two_processes_form_one_global_mesh(runs):
  with open(runs[2] / 'multi.npz.json') as f:
    info = json.load(f)
  assert info == {'processes': 2, 'devices': 8, 'mesh': dict(MESH, expert=1)}


def test_two_process_training_equals_single_process(runs):
  single, multi, _ = runs
  assert set(single.files) == set(multi.files)
  assert np.all(np.diff(single['losses']) != 0)   # it trained: the loss moved every step
  for name in single.files:
    np.testing.assert_allclose(multi[name], single[name], rtol=2e-5, atol=2e-6, err_msg=name)


def _launch(workdir) -> list[str]:
  """The launcher as two processes of 2 devices: 2 steps, a checkpoint after each; outputs.
  A 2-example packing window makes each host's pipeline position depend on its own records."""
  port = _free_port()
  args = ['--config=configs/lm.py:tiny', f'--workdir={workdir}', '--config.train.steps=2',
          '--config.train.log_every_steps=1', '--config.train.batch_size=8',
          '--config.data.pack_window=2', '--config.data.synthetic_train_size=2000',
          '--config.checkpoint.every_steps=1', f'--coordinator_address=127.0.0.1:{port}',
          '--num_processes=2', '--verbosity=0']
  return _wait([subprocess.Popen([sys.executable, '-m', 'experiments.run', *args,
                                  f'--process_id={i}'], cwd=REPO, env=_env(2),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for i in range(2)])


def test_launcher_two_processes_save_stop_and_resume(tmp_path):
  """Only process 0 writes logs and config; both processes write the checkpoint (each its own
  data position); a job stopped after step 1's checkpoint and relaunched resumes to the
  parameters of the job that never stopped."""
  _launch(tmp_path)
  records = read_metrics(tmp_path)
  assert [r['step'] for r in records] == [1, 2]   # one writer: a second would duplicate lines
  assert len(list((tmp_path / 'tensorboard').iterdir())) == 1   # one event file, one writer
  assert json.loads((tmp_path / 'config.json').read_text())['train']['steps'] == 2
  data = tmp_path / 'checkpoints' / '1' / 'data'
  positions = [json.loads((data / f'process_{i}-of-2.json').read_text()) for i in range(2)]
  assert positions[0] != positions[1]   # so resuming both from one would change the data
  unstopped = checkpoint_params(tmp_path, 2)
  shutil.rmtree(tmp_path / 'checkpoints' / '2')   # as if stopped right after step 1's save
  outs = _launch(tmp_path)
  assert all('Resumed from step 1.' in out for out in outs)
  assert [r['loss'] for r in read_metrics(tmp_path)] == [r['loss'] for r in records]
  jax.tree.map(np.testing.assert_array_equal, checkpoint_params(tmp_path, 2), unstopped)


def test_data_position_restores_only_with_the_saving_process_count(tmp_path):
  from train.checkpoint import PerProcessJsonHandler, PerProcessJsonSave
  handler = PerProcessJsonHandler()
  handler.save(tmp_path, PerProcessJsonSave({'batches': 3}))
  assert handler.restore(tmp_path) == {'batches': 3}
  (tmp_path / 'process_0-of-1.json').rename(tmp_path / 'process_0-of-2.json')
  with pytest.raises(ValueError, match=r"0-of-1.json is missing \(saved: \['process_0-of-2"):
    handler.restore(tmp_path)


def test_cluster_detection_and_flag_errors():
  from train.distributed import detected_cluster, maybe_initialize
  assert detected_cluster({}, tpu_devices=[]) is None
  assert detected_cluster({}, tpu_devices=['/dev/vfio/0']) == 'tpu'   # GCE TPU VM: metadata
  # GKE lists the workers: one is a single-host slice
  assert detected_cluster({'TPU_WORKER_HOSTNAMES': 'w0'}, tpu_devices=['/dev/accel0']) is None
  assert detected_cluster({'TPU_WORKER_HOSTNAMES': 'w0,w1'}) == 'tpu'
  assert detected_cluster({'TPU_PROCESS_ADDRESSES': 'a:1,b:1', 'TPU_WORKER_HOSTNAMES': 'a'},
                          tpu_devices=[]) == 'tpu'
  assert detected_cluster({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}) is None
  assert detected_cluster({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'}) == 'slurm'
  assert detected_cluster({'OMPI_COMM_WORLD_SIZE': '2'}) == 'mpi'
  assert maybe_initialize(env={}, tpu_devices=[]) is False
  with pytest.raises(ValueError, match='go together'):
    maybe_initialize('127.0.0.1:1', None, 0)
  with pytest.raises(ValueError, match='process_id'):
    maybe_initialize('127.0.0.1:1', 2, 2)


if __name__ == '__main__':
  _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
