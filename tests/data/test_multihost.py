"""Two processes (jax.distributed on 127.0.0.1) read disjoint shards that cover the dataset."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_read_disjoint_shards_covering_the_dataset(tmp_path):
  docs = [f'line {i} of the corpus' for i in range(45)]   # odd: the shards differ in size
  path = tmp_path / 'docs.txt'
  path.write_text('\n'.join(docs) + '\n')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'tests.data.multihost_worker', str(port), str(i), str(path),
       str(tmp_path / f'tfds{i}'), str(tmp_path / f'out{i}.json')],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  logs = [p.communicate(timeout=120)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  out = [json.loads((tmp_path / f'out{i}.json').read_text()) for i in range(2)]
  a, b = (set(o['seen']) for o in out)
  assert len(out[0]['seen']) == len(a) and len(out[1]['seen']) == len(b)
  assert not a & b and a | b == set(docs)
  assert {len(a), len(b)} == {22, 23}
  # 11 and 12 local batches of two rows: both hosts still stop together, after 12 global ones.
  assert out[0]['shapes'] == out[1]['shapes'] == [[4, 32]] * 12
  assert [o['stats']['process_index'] for o in out] == [0, 1]
