"""Launches one experiment config.

  python -m experiments.run --config=configs/lm.py:tiny --workdir=runs/tiny \
      --config.train.steps=100

Re-running the same command on the same workdir resumes from its newest checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from train.trainer import train

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file and preset, e.g. configs/lm.py:tiny.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (created; resumed if present).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:   # orbax logs every save at INFO; -v 0 shows it
    logging.set_verbosity(logging.WARNING)
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
