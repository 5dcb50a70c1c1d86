"""Model FLOPs per trained token (forward + backward), the numerator of MFU.

Convention (PaLM appendix B): 6 x matmul parameters the token passes through (embedding lookup
excluded, LM head included) + 12 x layers x attention width x sequence length for the
attention score and value products, counted in full even under a causal mask.
"""

from model.config import ModelConfig


def decoder_layer_params(cfg: ModelConfig) -> int:
  """Matmul parameters of one dense decoder layer (norm scales are negligible and left out)."""
  attn = cfg.d_model * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  gated = cfg.activation in ('swiglu', 'geglu')
  return attn + (3 if gated else 2) * cfg.d_model * cfg.mlp_dim


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token of `cfg` at `seq_len`."""
  if cfg.family != 'decoder':
    raise ValueError(f'No FLOPs formula for model.family={cfg.family!r}.')
  matmul_params = cfg.num_layers * decoder_layer_params(cfg) + cfg.d_model * cfg.vocab_size
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
  return 6.0 * matmul_params + attention
