"""Bidirectional encoder stack (T5's encoder) and the encoder-only masked-LM model.

Built from the shared layers (Embed, RMSNorm, Attention, MLP, layer_stack); positions are
rotary or T5's relative bias (`model.position_embedding`).
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.attention import Attention, layer_mask
from model.config import ModelConfig
from model.decoder import layer_stack
from model.layers import MLP, Embed, Projection, RMSNorm
from model.relative_position import RelativePositionBias

POSITION_EMBEDDINGS = ('rope', 'relative')


def check_positions(cfg: ModelConfig) -> None:
  """Raises, naming the key, for an unknown `model.position_embedding`."""
  if cfg.position_embedding not in POSITION_EMBEDDINGS:
    raise ValueError(f'model.position_embedding={cfg.position_embedding!r}; choose one of '
                     f'{POSITION_EMBEDDINGS}.')


def make_attention(cfg: ModelConfig, name: str, cross: bool = False) -> Attention:
  """Attention as the encoder-family config asks: rotary only for self-attention under 'rope',
  logits scaled unless `model.scale_attention` is off (T5)."""
  return Attention(cfg, use_rope=not cross and cfg.position_embedding == 'rope',
                   scale=None if cfg.scale_attention else 1.0, cross_cache=cross, name=name)


def vocab_logits(cfg: ModelConfig, embed: Embed, x: jax.Array) -> jax.Array:
  """float32 logits from the tied embedding (scaled by 1/sqrt(d_model)) or an lm_head."""
  if cfg.tie_embeddings:
    logits = embed.attend(x) / jnp.sqrt(cfg.d_model).astype(x.dtype)
  else:
    logits = Projection(cfg, (cfg.vocab_size,), ('embed',), ('vocab',), name='lm_head')(x)
  return nn.with_logical_constraint(logits.astype(jnp.float32), ('batch', 'length', 'vocab'))


class EncoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)) over the whole segment, then x + mlp(norm(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions, mask, deterministic, bias=None):
    cfg = self.cfg
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    h = RMSNorm(cfg, name='attn_norm')(x)
    h = make_attention(cfg, 'attn')(h, h, mask, positions, positions, bias=bias)
    x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    h = MLP(cfg, name='mlp')(RMSNorm(cfg, name='mlp_norm')(x))
    x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return x, None


class Encoder(nn.Module):
  """Token ids [B, L] -> final-normed hidden states [B, L, d_model]; packed rows attend only
  within their segment. `shared_embed` is the parent's table (T5); otherwise it owns 'embed'."""
  cfg: ModelConfig
  shared_embed: Optional[Embed] = None

  @nn.compact
  def __call__(self, inputs, positions, segment_ids, deterministic: bool = True):
    cfg = self.cfg
    check_positions(cfg)
    embed = self.shared_embed if self.shared_embed is not None else Embed(cfg, name='embed')
    x = nn.Dropout(cfg.dropout_rate)(embed(inputs), deterministic=deterministic)
    mask = layer_mask(cfg, segment_ids, segment_ids, causal=False)
    bias = None
    if cfg.position_embedding == 'relative':
      bias = RelativePositionBias(cfg, bidirectional=True, name='relpos')(positions, positions)
    x = layer_stack(EncoderLayer, cfg, 'layers', cfg.num_encoder_layers or cfg.num_layers)(
        x, positions, mask, deterministic, bias)
    x = RMSNorm(cfg, name='final_norm')(x)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class EncoderMLM(nn.Module):
  """Encoder-only masked LM: token ids [B, L] -> float32 logits [B, L, vocab] at every position
  (the objective scores the masked ones). Same call as the decoder's."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, inputs, positions, segment_ids, deterministic: bool = True):
    embed = Embed(self.cfg, name='embed')
    x = Encoder(self.cfg, shared_embed=embed, name='encoder')(inputs, positions, segment_ids,
                                                              deterministic)
    return vocab_logits(self.cfg, embed, x)
