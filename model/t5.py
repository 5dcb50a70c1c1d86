"""T5 (v1.1 conventions by config) encoder–decoder: shared embedding, bidirectional encoder,
causal decoder with cross-attention, relative position bias shared across each stack's layers.

T5 v1.1 = `position_embedding='relative'`, `scale_attention=False`, `activation='geglu'`,
`tie_embeddings=False` (v1.0: 'relu' and tied, logits rescaled by 1/sqrt(d_model)); see
configs/t5.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.attention import layer_mask
from model.config import ModelConfig
from model.decoder import layer_stack
from model.encoder import Encoder, check_positions, make_attention
from model.layers import MLP, Embed, RMSNorm, output_head
from model.relative_position import RelativePositionBias


class T5DecoderLayer(nn.Module):
  """Pre-norm blocks: causal self-attention, cross-attention to the encoder, MLP.

  With `decode` the attentions read and write the 'cache' collection (model/attention.py).
  """
  cfg: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, positions, mask, deterministic, bias, encoded, cross_mask):
    cfg = self.cfg
    drop = lambda h: nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    h = RMSNorm(cfg, name='attn_norm')(x)
    x = x + drop(make_attention(cfg, 'self_attn')(h, h, mask, positions, positions, bias=bias,
                                                  decode=self.decode,
                                                  deterministic=deterministic))
    h = RMSNorm(cfg, name='cross_norm')(x)
    x = x + drop(make_attention(cfg, 'cross_attn', cross=True)(
        h, encoded, cross_mask, decode=self.decode, deterministic=deterministic))
    x = x + drop(MLP(cfg, name='mlp')(RMSNorm(cfg, name='mlp_norm')(x), deterministic))
    return x, None


class T5Decoder(nn.Module):
  """Decoder ids [B, T] attending to `encoded` [B, S, d_model] -> the OutputHead over the
  final hidden states [B, T, d_model]."""
  cfg: ModelConfig
  shared_embed: Embed

  @nn.compact
  def __call__(self, encoded, encoder_segment_ids, inputs, positions, segment_ids,
               deterministic: bool = True, decode: bool = False, decode_length: int = 0):
    cfg = self.cfg
    x = nn.Dropout(cfg.dropout_rate)(self.shared_embed(inputs), deterministic=deterministic)
    cross_mask = layer_mask(cfg, segment_ids, encoder_segment_ids, causal=False)
    if decode:   # the cache masks future slots; bias spans every slot of the cache
      mask, kv_positions = None, jnp.arange(decode_length or inputs.shape[1])[None]
    else:
      mask, kv_positions = layer_mask(cfg, segment_ids, segment_ids, causal=True), positions
    bias = None
    if cfg.position_embedding == 'relative':
      bias = RelativePositionBias(cfg, bidirectional=False, name='relpos')(positions,
                                                                           kv_positions)
    stack = layer_stack(T5DecoderLayer, cfg, 'layers', cfg.num_decoder_layers or cfg.num_layers,
                        decode=decode)
    x = stack(x, positions, mask, deterministic, bias, encoded, cross_mask)
    x = RMSNorm(cfg, name='final_norm')(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    return output_head(cfg, self.shared_embed, x)


class T5(nn.Module):
  """Encoder–decoder over the data layer's 'span_corruption' batch format.

  `__call__` is teacher-forced training; `encode` and `decode` are its halves for generation
  (model/decoding.py): encode once, then decode with `decode=True` token by token from a cache.
  """
  cfg: ModelConfig

  def setup(self):
    check_positions(self.cfg)
    self.embed = Embed(self.cfg)
    self.encoder = Encoder(self.cfg, shared_embed=self.embed)
    self.decoder = T5Decoder(self.cfg, shared_embed=self.embed)

  def encode(self, inputs, positions, segment_ids, deterministic: bool = True) -> jax.Array:
    """Encoder ids [B, S] -> hidden states [B, S, d_model]."""
    return self.encoder(inputs, positions, segment_ids, deterministic)

  def decode(self, encoded, encoder_segment_ids, inputs, positions, segment_ids,
             deterministic: bool = True, decode: bool = False,
             decode_length: int = 0) -> jax.Array:
    """Decoder ids [B, T] -> logits [B, T, vocab]; `decode=True` uses the 'cache' collection
    whose self-attention slots number `decode_length`."""
    return self.decoder(encoded, encoder_segment_ids, inputs, positions, segment_ids,
                        deterministic, decode, decode_length).logits()

  def __call__(self, encoder_inputs, encoder_positions, encoder_segment_ids, decoder_inputs,
               decoder_positions, decoder_segment_ids, deterministic: bool = True,
               return_head: bool = False):
    """Teacher-forced logits [B, T, vocab] of the decoder targets (their OutputHead with
    `return_head`)."""
    encoded = self.encode(encoder_inputs, encoder_positions, encoder_segment_ids, deterministic)
    head = self.decoder(encoded, encoder_segment_ids, decoder_inputs, decoder_positions,
                        decoder_segment_ids, deterministic)
    return head if return_head else head.logits()
