"""LoRA: low-rank adapters on named projections, and folding them back into the kernels.

With `model.lora_rank` = r > 0, every Projection (model/layers.py) named in `model.lora_targets`
adds `lora_a` [*in, r] (fan-in init) and `lora_b` [r, *features] (zeros) and computes
y = x W + (lora_alpha / r) (x A) B, so fresh adapters leave the model's function unchanged.
While training, `model.lora_dropout` drops the adapter's input x.

Projection names: attention 'query', 'key', 'value', 'out' (self- and cross-attention share
them); MLP 'wi_0', 'wi_1' (gated) or 'wi', and 'wo'; the MLM head's 'dense'. MoE expert kernels
and the router are plain parameters, not Projections: in an MoE decoder the MLP names adapt the
dense layers and shared experts only. Embeddings and the output head are never adapted.
Which parameters then train is train/trainable.py's rule (the adapters only).

QLoRA: with `model.lora_quant='nf4'` every Projection's frozen kernel (adapted or not) is kept
in 4-bit NormalFloat (model/nf4.py) and dequantized where it is used; the adapters stay in the
weight dtype. MoE expert kernels, embeddings and output heads stay unquantized.
"""

import dataclasses
from typing import Callable

import jax.numpy as jnp

from model import nf4
from model.config import ModelConfig
from model.param_tree import partition

ADAPTER_NAMES = ('lora_a', 'lora_b')
QUANTIZATIONS = ('', 'nf4')


def targets(cfg: ModelConfig) -> frozenset[str]:
  """The projection names in `model.lora_targets`."""
  return frozenset(n.strip() for n in cfg.lora_targets.split(',') if n.strip())


def is_target(cfg: ModelConfig, name: str) -> bool:
  """Whether the projection called `name` carries an adapter."""
  return cfg.lora_rank > 0 and name in targets(cfg)


def quantized(cfg: ModelConfig) -> bool:
  """Whether projection kernels are stored quantized (QLoRA)."""
  return cfg.lora_quant == 'nf4'


def scale(cfg: ModelConfig) -> float:
  """Factor on the adapter's output, alpha / rank (rank changes keep the update's size)."""
  return cfg.lora_alpha / cfg.lora_rank


def is_adapter(path: tuple) -> bool:
  """Whether the parameter at `path` (a tuple of keys) is a LoRA adapter matrix."""
  return path[-1] in ADAPTER_NAMES


def split_adapters(params: dict) -> tuple[dict, dict]:
  """(the adapters, every other parameter), each nested as in `params`."""
  return partition(params, is_adapter)


def base_config(cfg: ModelConfig) -> ModelConfig:
  """`cfg` without adapters: the model whose (for QLoRA, quantized) weights they sit on."""
  return dataclasses.replace(cfg, lora_rank=0, lora_targets='')


def check_config(cfg: ModelConfig,
                 projection_names: Callable[[ModelConfig], frozenset[str]]) -> None:
  """Raises, naming the key, for a negative rank, targets without a rank (or a rank without
  targets) and target names that match no projection; `projection_names(base config)` lists
  the model's projections (called only when LoRA is on)."""
  if cfg.lora_rank < 0:
    raise ValueError(f'model.lora_rank={cfg.lora_rank} must be >= 0 (0 = LoRA off).')
  if cfg.lora_quant not in QUANTIZATIONS:
    raise ValueError(f'model.lora_quant={cfg.lora_quant!r}; choose one of {QUANTIZATIONS}.')
  if not cfg.lora_rank:
    if cfg.lora_targets:
      raise ValueError(f'model.lora_targets={cfg.lora_targets!r} needs model.lora_rank > 0; '
                       'set a rank or clear the targets.')
    return
  valid = sorted(projection_names(base_config(cfg)))
  wanted = targets(cfg)
  if not wanted:
    raise ValueError(f'model.lora_rank={cfg.lora_rank} needs model.lora_targets: '
                     f'comma-separated projection names from {valid}.')
  unknown = sorted(wanted - set(valid))
  if unknown:
    raise ValueError(f'model.lora_targets={cfg.lora_targets!r}: {unknown} match no projection '
                     f'of this {cfg.family!r} model; valid names: {valid}.')


def _merged_kernel(kernel, a, b, factor: float):
  """kernel + factor * A B, computed in float32; A [*lead, *in, r], B [*lead, r, *out] with
  the kernel's leading (scanned layer) axes."""
  lead = a.ndim + b.ndim - 2 - kernel.ndim
  a2 = jnp.reshape(a, a.shape[:lead] + (-1, a.shape[-1])).astype(jnp.float32)
  b2 = jnp.reshape(b, b.shape[:lead + 1] + (-1,)).astype(jnp.float32)
  delta = jnp.reshape(jnp.matmul(a2, b2), kernel.shape)
  return (kernel.astype(jnp.float32) + factor * delta).astype(kernel.dtype)


def dequantize_kernels(params: dict, dtype) -> dict:
  """`params` with every NF4 kernel (nf4.PARTS) as a 'kernel' in `dtype`."""
  if not isinstance(params, dict):
    return params
  out = {k: dequantize_kernels(v, dtype) for k, v in params.items() if k not in nf4.PARTS}
  if nf4.PARTS[0] in params:
    out['kernel'] = nf4.dequantize(*(params[name] for name in nf4.PARTS), dtype)
  return out


def merge_lora(params: dict, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
  """(params, cfg) of the same function without LoRA: NF4 kernels are dequantized, each
  adapted kernel becomes kernel + scale * A B and the adapters are dropped. Without LoRA,
  returned unchanged."""
  if quantized(cfg):
    params = dequantize_kernels(params, jnp.dtype(cfg.weight_dtype))
    cfg = dataclasses.replace(cfg, lora_quant='')
  if not cfg.lora_rank:
    return params, cfg
  adapters, merged = split_adapters(params)

  def fold(tree, adapter):
    for name, sub in adapter.items():
      if 'lora_a' in sub:
        tree[name] = dict(tree[name], kernel=_merged_kernel(
            tree[name]['kernel'], sub['lora_a'], sub['lora_b'], scale(cfg)))
      else:
        fold(tree[name], sub)

  fold(merged, adapters)
  return merged, base_config(cfg)
