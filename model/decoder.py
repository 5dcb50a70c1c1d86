"""Llama-style decoder: pre-norm blocks of causal attention and a gated MLP."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.attention import Attention, layer_mask
from model.config import ModelConfig
from model.layers import MLP, Embed, RMSNorm, output_head
from model.moe import MOE_COLLECTION, MoE

REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_saveable,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderLayer(nn.Module):
  """x + attn(norm(x)), then x + mlp(norm(x)) (MoE block if `moe`). Returns (x, None) so it
  can be scanned. With `decode` attention reads and appends to the 'cache' collection.
  `valid` [B, L] marks real tokens: the MoE block routes no padding."""
  cfg: ModelConfig
  moe: bool = False
  decode: bool = False

  @nn.compact
  def __call__(self, x, positions, mask, deterministic, valid=None):
    cfg = self.cfg
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    h = RMSNorm(cfg, name='attn_norm')(x)
    h = Attention(cfg, name='attn')(h, h, mask, positions, positions, decode=self.decode,
                                    deterministic=deterministic)
    x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    h = RMSNorm(cfg, name='mlp_norm')(x)
    h = (MoE(cfg, name='mlp')(h, valid, deterministic) if self.moe
         else MLP(cfg, name='mlp')(h, deterministic))
    x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return x, None


class MoEBlock(nn.Module):
  """`cfg.moe_every - 1` dense layers then one MoE layer: the repeating unit that is scanned."""
  cfg: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, positions, mask, deterministic, valid):
    for i in range(self.cfg.moe_every - 1):
      x = DecoderLayer(self.cfg, decode=self.decode, name=f'dense_{i}')(x, positions, mask,
                                                                         deterministic)[0]
    return DecoderLayer(self.cfg, moe=True, decode=self.decode, name='moe')(x, positions, mask,
                                                                            deterministic, valid)


def moe_layout(cfg: ModelConfig) -> tuple[int, int]:
  """(leading dense layers, MoE blocks of `moe_every` layers) for an MoE config."""
  dense, every = cfg.first_dense_layers, cfg.moe_every
  if every < 1 or not 0 <= dense < cfg.num_layers or (cfg.num_layers - dense) % every:
    raise ValueError(f'model.num_layers={cfg.num_layers} minus model.first_dense_layers={dense} '
                     f'must be a positive multiple of model.moe_every={every}.')
  return dense, (cfg.num_layers - dense) // every


def layer_stack(layer_cls, cfg: ModelConfig, name: str = 'layers', num_layers: int = 0,
                **attributes):
  """`num_layers` (default `cfg.num_layers`) copies of `layer_cls(cfg, **attributes)` applied
  in sequence, scanned or unrolled.

  Scanned parameters are stacked on a leading 'layers' axis under `name`; unrolled ones live
  under `{name}_{i}`. `stack_layers`/`unstack_layers` convert between the two layouts.
  """
  if cfg.remat_policy not in REMAT_POLICIES:
    raise ValueError(f'model.remat_policy={cfg.remat_policy!r}; choose one of '
                     f'{sorted(REMAT_POLICIES)}.')
  if cfg.remat_policy != 'none':
    layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[cfg.remat_policy],
                         prevent_cse=not cfg.scan_layers, static_argnums=(4,))

  num_layers = num_layers or cfg.num_layers

  def apply(x, *args):
    if cfg.scan_layers:
      scanned = nn.scan(layer_cls, variable_axes={'params': 0, MOE_COLLECTION: 0, 'cache': 0},
                        split_rngs={'params': True, 'dropout': True},
                        in_axes=(nn.broadcast,) * len(args), length=num_layers,
                        metadata_params={nn.PARTITION_NAME: 'layers'})
      return scanned(cfg, name=name, **attributes)(x, *args)[0]
    for i in range(num_layers):
      x = layer_cls(cfg, name=f'{name}_{i}', **attributes)(x, *args)[0]
    return x

  return apply


class Decoder(nn.Module):
  """Token ids [B, L] -> float32 logits [B, L, vocab] (with `return_head`, their OutputHead:
  the final hidden states and the output projection); packed rows via segment ids/positions.

  With `decode=True` keys/values accumulate in the 'cache' collection (model/attention.py; the
  first call only sizes it) and `kv_segment_ids` [B, cache slots] give each slot's segment
  (0 = padding): a token attends to the filled slots of its own segment (model/decoding.py).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, inputs, positions, segment_ids, deterministic: bool = True,
               decode: bool = False, kv_segment_ids=None, return_head: bool = False):
    cfg = self.cfg
    embed = Embed(cfg, name='embed')
    x = embed(inputs)
    if decode:   # the cache adds causality over its slots
      mask = layer_mask(cfg, segment_ids, kv_segment_ids, causal=False)
    else:
      mask = layer_mask(cfg, segment_ids, segment_ids, causal=True)
    if cfg.num_experts:
      # Leading dense layers and the MoE blocks are two scans, so every pattern compiles once.
      dense, blocks = moe_layout(cfg)
      if dense:
        x = layer_stack(DecoderLayer, cfg, 'dense_layers', dense, decode=decode)(
            x, positions, mask, deterministic)
      x = layer_stack(MoEBlock, cfg, 'layers', blocks, decode=decode)(
          x, positions, mask, deterministic, segment_ids > 0)
    else:
      x = layer_stack(DecoderLayer, cfg, decode=decode)(x, positions, mask, deterministic)
    head = output_head(cfg, embed, RMSNorm(cfg, name='final_norm')(x))
    return head if return_head else head.logits()


def stack_layers(params: dict, num_layers: int, name: str = 'layers') -> dict:
  """Unrolled layout {name}_{i} -> scanned layout {name} with a leading layer axis."""
  out = {k: v for k, v in params.items() if not k.startswith(f'{name}_')}
  per_layer = [params[f'{name}_{i}'] for i in range(num_layers)]
  out[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
  return out


def unstack_layers(params: dict, num_layers: int, name: str = 'layers') -> dict:
  """Scanned layout {name} -> unrolled layout {name}_{i}."""
  out = {k: v for k, v in params.items() if k != name}
  for i in range(num_layers):
    out[f'{name}_{i}'] = jax.tree.map(lambda x, i=i: x[i], params[name])
  return out
