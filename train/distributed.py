"""Multi-host start-up: join the JAX distributed system when this job spans several processes.

Call `maybe_initialize` before anything touches a device. Explicit arguments win; otherwise a
Cloud TPU VM, a SLURM job or an Open MPI launch with more than one process is detected from
its environment and JAX's own cluster detection fills in the addresses. A single process
elsewhere does nothing, so laptops and one-GPU boxes need no flags.
"""

import glob
import importlib.util
import os
from typing import Mapping, Optional, Sequence

import jax
from absl import logging


def _count(value: Optional[str]) -> int:
  try:
    return int(value or 1)
  except ValueError:
    return 1


def tpu_vm_devices() -> list:
  """TPU chips this host exposes (/dev/accel* on v2-v4, /dev/vfio/N on v5e and later) when
  libtpu is installed; empty elsewhere."""
  if importlib.util.find_spec('libtpu') is None:
    return []
  return glob.glob('/dev/accel[0-9]*') + glob.glob('/dev/vfio/[0-9]*')


def detected_cluster(env: Mapping[str, str] = os.environ,
                     tpu_devices: Optional[Sequence[str]] = None) -> Optional[str]:
  """Name of the multi-process launcher found ('tpu', 'slurm', 'mpi'), or None when `env`
  describes a single process. A Cloud TPU VM counts as 'tpu' even alone: its pod's workers are
  listed in the GCE metadata, not the environment, and JAX reads them (`tpu_devices`: the host's
  TPU chips, default `tpu_vm_devices()`). GKE lists them in TPU_PROCESS_ADDRESSES or
  TPU_WORKER_HOSTNAMES."""
  workers = env.get('TPU_PROCESS_ADDRESSES') or env.get('TPU_WORKER_HOSTNAMES', '')
  if len([h for h in workers.split(',') if h]) > 1:
    return 'tpu'
  if 'SLURM_JOB_ID' in env and _count(env.get('SLURM_NTASKS')) > 1:
    return 'slurm'
  if _count(env.get('OMPI_COMM_WORLD_SIZE')) > 1:
    return 'mpi'
  if tpu_devices is None:
    tpu_devices = tpu_vm_devices()
  return 'tpu' if tpu_devices and not workers else None


def maybe_initialize(coordinator_address: Optional[str] = None,
                     num_processes: Optional[int] = None,
                     process_id: Optional[int] = None,
                     env: Mapping[str, str] = os.environ,
                     tpu_devices: Optional[Sequence[str]] = None) -> bool:
  """Calls `jax.distributed.initialize` when this job has more than one process.

  With `coordinator_address` (host:port), `num_processes` and `process_id` all given, they are
  used as they are (any platform, CPU included: collectives then go over gloo). With none given,
  a detected TPU VM (pod slice or single host), SLURM or MPI cluster is joined through JAX's
  auto-detection. Returns whether the distributed system was initialized.
  """
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError('--coordinator_address, --num_processes and --process_id go together: '
                       f'got {coordinator_address!r}, {num_processes!r}, {process_id!r}.')
    if not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id={process_id} must lie in [0, --num_processes='
                       f'{num_processes}).')
    if num_processes == 1:
      return False
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  else:
    cluster = detected_cluster(env, tpu_devices)
    if cluster is None:
      return False
    logging.info('Detected a multi-process %s launch; joining the JAX distributed system.',
                 cluster)
    jax.distributed.initialize()
  logging.info('Process %d of %d: %d local / %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
