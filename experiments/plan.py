"""Will it fit? Parameter count, FLOPs and per-device memory of a config, without running it.

  python -m experiments.run --config=configs/lm.py:llama3_8b --dry_run --device=v5p \
      --num_devices=256

Everything is abstract: parameters and optimizer state come from `jax.eval_shape`, the train
step is lowered and compiled ahead of time for the config's mesh (on `--num_devices` fake CPU
devices when the real ones are absent) and XLA's memory analysis of that compiled step gives
the per-device totals. No array is allocated and no step runs, so planning a 256-chip job works
on a laptop.
"""

import json
import math
from typing import Optional

import flax.linen as nn
import jax

from data.pipeline import batch_spec
from model import nf4
from train.hardware import device_memory
from train.trainer import Experiment


def use_fake_cpu_devices(n: int) -> None:
  """Makes JAX present `n` CPU devices; must run before anything initializes a backend."""
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', n)
  if jax.device_count() != n:
    raise RuntimeError(f'--num_devices={n}: JAX already started with {jax.device_count()} '
                       'devices; plan in a fresh process.')


def _bytes_per_device(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def param_counts(exp: Experiment, rng) -> tuple[int, int]:
  """(total, active per token) parameters, from shapes only: a stack of expert matrices (an
  'expert' axis followed by two more) counts k of its E experts as active; routers and biases
  count in full. A QLoRA kernel counts its weights (two a code byte), not its absmaxes."""
  cfg = exp.model_cfg
  with exp.partitioner.activate():
    boxed_params = jax.eval_shape(exp.objective.init_fn, rng)
  specs = jax.tree.leaves(nn.get_partition_spec(boxed_params),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  leaves = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(boxed_params))
  total = active = 0
  for (path, leaf), names in zip(leaves, specs):
    name = getattr(path[-1], 'key', None)
    if name == nf4.PARTS[1]:   # block absmaxes
      continue
    size = math.prod(leaf.shape) * (2 if name == nf4.PARTS[0] else 1)
    total += size
    names = tuple(names)
    routed = cfg.num_experts and 'expert' in names and names.index('expert') < len(names) - 2
    active += size * cfg.num_experts_per_tok // cfg.num_experts if routed else size
  return total, active


def abstract_batch(config, sharding) -> dict:
  """ShapeDtypeStructs of one global batch of `config.data.task`."""
  return {k: jax.ShapeDtypeStruct((config.train.batch_size, n), dt, sharding=sharding)
          for k, (n, dt) in batch_spec(config).items()}


def plan(config, device: Optional[str] = None) -> dict:
  """The memory and FLOPs plan of `config`'s train step on the current devices (a dict)."""
  exp = Experiment.from_config(config)
  rng = jax.random.key(config.seed)
  total, active = param_counts(exp, rng)
  state, shardings = exp.partitioner.abstract(exp.init_state, rng)
  shards = exp.partitioner.batch_shards
  if config.train.batch_size % shards:
    raise ValueError(f'train.batch_size={config.train.batch_size} does not split over the '
                     f'{shards} batch shards of mesh {dict(exp.partitioner.mesh.shape)}; use a '
                     f'multiple of {shards} or another --num_devices / mesh.')
  batch = abstract_batch(config, exp.partitioner.batch_sharding)
  lowered = exp.jit_train_step(shardings).lower(state, batch)
  compiled = lowered.compile()
  mem = compiled.memory_analysis()
  params = _bytes_per_device(state.model_params())
  grads = _bytes_per_device(state.params)   # shapes, dtypes and shardings of the trained ones
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes)
  try:
    fpt = exp.flops_per_token()
  except ValueError:   # a family without a FLOPs formula still gets its memory plan
    fpt = None
  out = {
      'mesh': dict(exp.partitioner.mesh.shape),
      'devices': exp.partitioner.mesh.size,
      'params_total': total,
      'params_active': active,
      'flops_per_token': fpt,
      'tokens_per_step': config.train.batch_size * config.data.seq_len,
      'per_device_bytes': {
          'params': params,
          'optimizer_state': _bytes_per_device(state.opt_state),
          'gradients': grads,
          'batch': _bytes_per_device(batch),
          'activations': max(mem.temp_size_in_bytes - grads, 0),
          'compiled_arguments': mem.argument_size_in_bytes,
          'compiled_temp': mem.temp_size_in_bytes,
          'compiled_peak': peak,
      },
  }
  if device is not None:
    capacity = device_memory(device)
    out.update(device=device, device_memory_bytes=capacity, fits=peak <= capacity)
  return out


def _gib(n: int) -> str:
  return f'{n / 2 ** 30:9.3f} GiB' if n >= 2 ** 30 else f'{n / 2 ** 20:9.3f} MiB'


def report(p: dict) -> str:
  """Human-readable plan followed by the same plan as one JSON line."""
  fpt = p['flops_per_token']
  lines = [f"mesh {p['mesh']} ({p['devices']} devices)",
           f"parameters: {p['params_total']:,} total, {p['params_active']:,} active per token",
           f"model FLOPs per token: {fpt:.4g}" if fpt else 'model FLOPs per token: n/a',
           'per-device memory:']
  lines += [f'  {k:20s}{_gib(v)}' for k, v in p['per_device_bytes'].items()]
  if 'device' in p:
    verdict = 'fits' if p['fits'] else 'does NOT fit'
    lines.append(f"{verdict} on {p['device']} ({_gib(p['device_memory_bytes']).strip()})")
  return '\n'.join(lines + [json.dumps(p)])


def main(config, device: Optional[str] = None, num_devices: Optional[int] = None) -> dict:
  """The --dry_run entry point: optionally fake `num_devices` CPU devices, plan, print."""
  if device is not None:
    device_memory(device)   # a bad name fails before the slow compile
  if num_devices:
    use_fake_cpu_devices(num_devices)
  p = plan(config, device)
  print(report(p), flush=True)
  return p

