"""Small shared test builders: a tiny config, random packed batches, sub-meshes."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from configs.base import base_config
from train.sharding import Partitioner, make_mesh


def tiny_config(**model) -> ml_collections.ConfigDict:
  """A decoder small enough to compile in a second, sized to shard over up to 8 devices."""
  c = base_config()
  c.model.update(dict(dict(vocab_size=128, d_model=64, num_layers=2, num_heads=8,
                           num_kv_heads=4, head_dim=16, mlp_dim=128), **model))
  c.data.seq_len = 16
  c.train.update(batch_size=8, warmup_steps=2, steps=10)
  return c


def packed_batch(batch: int, length: int, vocab: int, seed: int = 0) -> dict:
  """Random 'lm' batch; each row packs two documents and ends in padding."""
  rng = np.random.RandomState(seed)
  tokens = rng.randint(3, vocab, (batch, length + 1))
  cut, end = length // 3, length - 2
  seg = np.zeros((batch, length), np.int32)
  seg[:, :cut], seg[:, cut:end] = 1, 2
  pos = np.where(np.arange(length) < cut, np.arange(length), np.arange(length) - cut)
  pos = np.where(seg > 0, pos, 0)
  return {'inputs': jnp.asarray(tokens[:, :-1], jnp.int32),
          'targets': jnp.asarray(tokens[:, 1:], jnp.int32),
          'segment_ids': jnp.asarray(seg), 'positions': jnp.asarray(pos, jnp.int32),
          'loss_mask': jnp.asarray(seg > 0, jnp.float32)}


def partitioner(**axes) -> Partitioner:
  """Partitioner over the first prod(axes) devices; unnamed axes are 1."""
  shape = {'data': 1, 'fsdp': 1, 'tensor': 1, 'expert': 1, **axes}
  n = int(np.prod(list(shape.values())))
  return Partitioner(make_mesh(shape, jax.devices()[:n]))


def read_metrics(workdir) -> list[dict]:
  """The records of WORKDIR/metrics.jsonl."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def checkpoint_params(workdir, step: int):
  """Parameters of the checkpoint at `step` in WORKDIR/checkpoints, restored onto one device
  (whatever mesh, or how many processes, saved it)."""
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                  item_handlers={'state': ocp.StandardCheckpointHandler()})
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        manager.item_metadata(step)['state'])
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  return restored['state']['params']
