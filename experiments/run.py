"""Launches one experiment config.

  python -m experiments.run --config=configs/lm.py:tiny --workdir=runs/tiny \
      --config.train.steps=100

Re-running the same command on the same workdir resumes from its newest checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from train.distributed import maybe_initialize
from train.host_malloc import CHOICES, cpu_only, reexec_under
from train.trainer import train

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file and preset, e.g. configs/lm.py:tiny.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (created; resumed if present).')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the memory/FLOPs plan (experiments/plan.py) '
                             'for the config on its mesh and exit without running a step.')
_DEVICE = flags.DEFINE_string('device', None, 'With --dry_run: say whether the plan fits this '
                              'device\'s memory (v4, v5p, h100, ...; train/hardware.py).')
_NUM_DEVICES = flags.DEFINE_integer('num_devices', None, 'With --dry_run: mesh size to plan for '
                                    '(fake CPU devices); default: the devices present.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'Multi-host: host:port of '
                                   'process 0 (omit on TPU pods, SLURM and MPI: auto-detected).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-host: processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-host: this process, 0-based.')
_HOST_MALLOC = flags.DEFINE_enum('host_malloc', 'auto', CHOICES, 'CPU-only hosts: the allocator '
                                 'settings to re-run under (train/host_malloc.py); auto = tcmalloc '
                                 "where installed, else glibc 'keep'.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:   # orbax logs every save at INFO; -v 0 shows it
    logging.set_verbosity(logging.WARNING)
  if _DRY_RUN.value:
    from experiments.plan import main as plan_main   # only a dry run pays for the planner
    plan_main(_CONFIG.value, _DEVICE.value, _NUM_DEVICES.value)
    return
  if _WORKDIR.value is None:
    raise app.UsageError('--workdir is required (except with --dry_run).')
  if cpu_only():
    try:
      reexec_under(_HOST_MALLOC.value)
    except ValueError as e:
      raise app.UsageError(f'--host_malloc: {e}') from e
  maybe_initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
