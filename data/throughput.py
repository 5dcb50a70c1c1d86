"""Input-pipeline throughput: global tokens per second that build_pipeline delivers.

  python -m data.throughput --config=configs/lm.py:tiny [--config.data.task=sft] \
      [--batches=50] [--repeats=5]

experiments/bench.py can call ``measure`` directly.
"""

from __future__ import annotations

import statistics
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from data import pipeline

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file and preset, e.g. '
                                          'configs/lm.py:tiny.', lock_config=True)
_BATCHES = flags.DEFINE_integer('batches', 50, 'Batches per timed run.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed runs; the median is reported.')


def measure(config, *, batches: int = 50, repeats: int = 5, warmup: int = 20) -> dict:
  """Median tokens/s (row slots, padding included) over ``repeats`` runs of ``batches``."""
  mesh = jax.make_mesh((len(jax.devices()),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data', None))
  p = pipeline.build_pipeline(config, sharding)
  try:
    for _ in range(warmup):
      next(p)
    rates = []
    for _ in range(repeats):
      start, tokens = time.perf_counter(), 0
      for _ in range(batches):
        batch = next(p)
        tokens += next(iter(batch.values())).size
      jax.block_until_ready(batch)
      rates.append(tokens / (time.perf_counter() - start))
    stats = p.stats()
  finally:
    p.close()
  return {'tokens_per_s': statistics.median(rates), 'runs': rates,
          'packing_efficiency': stats['packing_efficiency']}


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  r = measure(config, batches=_BATCHES.value, repeats=_REPEATS.value)
  print(f"task={config.data.task} batch={config.train.batch_size}x{config.data.seq_len}: "
        f"{r['tokens_per_s']:,.0f} tokens/s (median of {_REPEATS.value}; runs "
        f"{', '.join(f'{x:,.0f}' for x in r['runs'])}); packing efficiency "
        f"{r['packing_efficiency']:.3f}")


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
