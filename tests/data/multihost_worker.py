"""One process of the two-process pipeline test (run by test_multihost.py, not by pytest).

Usage: python -m tests.data.multihost_worker PORT PROCESS_ID DOCS_FILE DATA_DIR OUT_JSON
Reads one epoch of DOCS_FILE (one document per line) and writes what this process saw.
"""

import json
import sys

import jax
import numpy as np


def main(port: str, process_id: str, docs: str, data_dir: str, out: str) -> None:
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                             process_id=int(process_id))
  from configs import base
  from data import pipeline

  c = base.base_config()
  c.train.batch_size = 4   # two rows per host: shards of 22 and 23 rows end a step apart
  c.data.update(seq_len=32, source=f'text:{docs}', text_unit='line', num_epochs=1,
                data_dir=data_dir)
  mesh = jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data', None))
  p = pipeline.build_pipeline(c, sharding)
  seen, shapes = [], []
  for batch in p:
    shapes.append(list(batch['inputs'].shape))
    local = {k: np.concatenate([np.asarray(s.data) for s in sorted(
        v.addressable_shards, key=lambda s: s.index[0].start)]) for k, v in batch.items()}
    for r in range(local['segment_ids'].shape[0]):
      seg = local['segment_ids'][r]
      for s in range(1, seg.max() + 1):
        seen.append(p.tokenizer.decode(local['inputs'][r][seg == s]))
  with open(out, 'w') as f:
    json.dump({'seen': seen, 'shapes': shapes, 'stats': p.stats()}, f)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main(*sys.argv[1:])
