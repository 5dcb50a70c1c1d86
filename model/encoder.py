"""Bidirectional encoder stack (T5's encoder) and the encoder-only masked-LM model.

Built from the shared layers (Embed, norms, Attention, MLP, layer_stack). Positions are rotary,
T5's relative bias or a learned absolute table (`model.position_embedding`); BERT/RoBERTa add
token types, an embedding norm, post-norm blocks and their MLM head (the encoder options of
model/config.py).
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.attention import Attention, layer_mask
from model.config import ModelConfig
from model.decoder import layer_stack
from model.layers import (ACTIVATIONS, MLP, Embed, OutputHead, Projection, Unembed, make_norm,
                          output_head)
from model.relative_position import RelativePositionBias

POSITION_EMBEDDINGS = ('rope', 'relative', 'learned')
NORM_POSITIONS = ('pre', 'post')
# Options only the 'encoder' family reads (with position_embedding='learned'): elsewhere an error.
ENCODER_ONLY = ('norm_type', 'norm_position', 'type_vocab_size', 'embed_norm', 'mlm_head')


def check_positions(cfg: ModelConfig) -> None:
  """Raises, naming the key, for an unknown `model.position_embedding` or `norm_position`."""
  if cfg.position_embedding not in POSITION_EMBEDDINGS:
    raise ValueError(f'model.position_embedding={cfg.position_embedding!r}; choose one of '
                     f'{POSITION_EMBEDDINGS}.')
  if cfg.norm_position not in NORM_POSITIONS:
    raise ValueError(f'model.norm_position={cfg.norm_position!r}; choose one of '
                     f'{NORM_POSITIONS}.')


def check_encoder_only(cfg: ModelConfig) -> None:
  """Raises when another family is given encoder-only options, which it would ignore."""
  if cfg.family == 'encoder':
    return
  default = ModelConfig()
  given = [f'model.{k}={getattr(cfg, k)!r}' for k in ENCODER_ONLY
           if getattr(cfg, k) != getattr(default, k)]
  if cfg.position_embedding == 'learned':
    given.append("model.position_embedding='learned'")
  if given:
    raise ValueError(f'{", ".join(given)} apply to model.family=encoder only, not '
                     f'{cfg.family!r}; leave them at their defaults.')


def make_attention(cfg: ModelConfig, name: str, cross: bool = False) -> Attention:
  """Attention as the encoder-family config asks: rotary only for self-attention under 'rope',
  logits scaled unless `model.scale_attention` is off (T5)."""
  return Attention(cfg, use_rope=not cross and cfg.position_embedding == 'rope',
                   scale=None if cfg.scale_attention else 1.0, cross_cache=cross, name=name)


class EncoderLayer(nn.Module):
  """Attention over the whole segment, then the MLP, each added to the residual stream
  pre-norm, x + f(norm(x)) (T5), or post-norm, norm(x + f(x)) (BERT)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions, mask, deterministic, bias=None):
    cfg = self.cfg
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    attend = lambda h: make_attention(cfg, 'attn')(h, h, mask, positions, positions, bias=bias,
                                                   deterministic=deterministic)
    mlp = lambda h: MLP(cfg, name='mlp')(h, deterministic)
    for f, norm in ((attend, make_norm(cfg, 'attn_norm')), (mlp, make_norm(cfg, 'mlp_norm'))):
      if cfg.norm_position == 'post':
        x = norm(x + nn.Dropout(cfg.dropout_rate)(f(x), deterministic=deterministic))
      else:
        x = x + nn.Dropout(cfg.dropout_rate)(f(norm(x)), deterministic=deterministic)
    return x, None


class Encoder(nn.Module):
  """Token ids [B, L] -> hidden states [B, L, d_model] (final-normed when pre-norm); packed
  rows attend only within their segment. `shared_embed` is the parent's table (T5, MLM);
  otherwise it owns 'embed'. `token_types` [B, L] (default 0) index the token-type table."""
  cfg: ModelConfig
  shared_embed: Optional[Embed] = None

  @nn.compact
  def __call__(self, inputs, positions, segment_ids, deterministic: bool = True,
               token_types: Optional[jax.Array] = None):
    cfg = self.cfg
    check_positions(cfg)
    embed = self.shared_embed if self.shared_embed is not None else Embed(cfg, name='embed')
    x = embed(inputs)
    if cfg.position_embedding == 'learned':
      if inputs.shape[1] + cfg.position_offset > cfg.max_positions:
        raise ValueError(f'Length {inputs.shape[1]} + model.position_offset='
                         f'{cfg.position_offset} exceeds model.max_positions='
                         f'{cfg.max_positions} learned positions; shorten data.seq_len.')
      x += Embed(cfg, cfg.max_positions, None, name='pos_embed')(positions + cfg.position_offset)
    if cfg.type_vocab_size:
      types = jnp.zeros_like(inputs) if token_types is None else token_types
      x += Embed(cfg, cfg.type_vocab_size, None, name='type_embed')(types)
    if cfg.embed_norm:
      x = make_norm(cfg, 'embed_norm')(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    mask = layer_mask(cfg, segment_ids, segment_ids, causal=False)
    bias = None
    if cfg.position_embedding == 'relative':
      bias = RelativePositionBias(cfg, bidirectional=True, name='relpos')(positions, positions)
    x = layer_stack(EncoderLayer, cfg, 'layers', cfg.num_encoder_layers or cfg.num_layers)(
        x, positions, mask, deterministic, bias)
    if cfg.norm_position == 'pre':   # post-norm blocks already end in a norm
      x = make_norm(cfg, 'final_norm')(x)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class MLMHead(nn.Module):
  """BERT's masked-LM head: dense, activation and norm, then the tied token embedding plus a
  bias per vocabulary entry as the output projection."""
  cfg: ModelConfig
  shared_embed: Embed

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> OutputHead:
    cfg = self.cfg
    act, _ = ACTIVATIONS[cfg.activation]
    h = Projection(cfg, (cfg.d_model,), ('embed',), ('mlp',), use_bias=True, name='dense')(
        x, deterministic)
    h = make_norm(cfg, 'norm')(act(h))
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('vocab',)),
                      (cfg.vocab_size,), cfg.weight_dtype)
    dtype = cfg.compute_dtype
    return OutputHead(h.astype(dtype), self.shared_embed.embedding.astype(dtype),
                      bias.astype(dtype), matmul_impl=cfg.matmul_impl)


class EncoderMLM(nn.Module):
  """Encoder-only masked LM: token ids [B, L] -> float32 logits [B, L, vocab] at every position
  (the objective scores the masked ones). Same call as the decoder's, `return_head` included;
  `encode` gives the hidden states (what transformers' BertModel returns)."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed = Embed(cfg)
    self.encoder = Encoder(cfg, shared_embed=self.embed)
    if cfg.mlm_head:
      self.mlm_head = MLMHead(cfg, self.embed)
    elif not cfg.tie_embeddings:
      self.lm_head = Unembed(cfg)

  def encode(self, inputs, positions, segment_ids, deterministic: bool = True,
             token_types: Optional[jax.Array] = None) -> jax.Array:
    """Hidden states [B, L, d_model]."""
    return self.encoder(inputs, positions, segment_ids, deterministic, token_types)

  def __call__(self, inputs, positions, segment_ids, deterministic: bool = True,
               token_types: Optional[jax.Array] = None, return_head: bool = False):
    x = self.encode(inputs, positions, segment_ids, deterministic, token_types)
    if self.cfg.mlm_head:
      head = self.mlm_head(x, deterministic)
    else:
      head = output_head(self.cfg, self.embed, x,
                         None if self.cfg.tie_embeddings else self.lm_head)
    return head if return_head else head.logits()
