"""Model FLOPs per trained token (forward + backward), the numerator of MFU.

Convention (PaLM appendix B): 6 x matmul parameters the token passes through (embedding lookup
excluded, LM head included) + 12 x layers x attention width x sequence length for the
attention score and value products, counted in full even under a causal mask.
"""

from model.config import ModelConfig


def decoder_layer_params(cfg: ModelConfig, moe: bool = False) -> int:
  """Matmul parameters one token passes through in a decoder layer (norm scales are negligible
  and left out); for an MoE layer the ACTIVE ones: router, k routed and the shared experts."""
  attn = cfg.d_model * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  per_width = (3 if cfg.activation in ('swiglu', 'geglu') else 2) * cfg.d_model
  if not moe:
    return attn + per_width * cfg.mlp_dim
  experts = cfg.num_experts_per_tok + cfg.num_shared_experts
  return (attn + cfg.d_model * cfg.num_experts
          + per_width * experts * (cfg.expert_mlp_dim or cfg.mlp_dim))


def active_layer_params(cfg: ModelConfig) -> int:
  """Matmul parameters a token passes through in all decoder layers (dense or MoE)."""
  moe_layers = 0
  if cfg.num_experts:
    moe_layers = (cfg.num_layers - cfg.first_dense_layers) // cfg.moe_every
  return ((cfg.num_layers - moe_layers) * decoder_layer_params(cfg)
          + moe_layers * decoder_layer_params(cfg, moe=True))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token of `cfg` at `seq_len`."""
  if cfg.family != 'decoder':
    raise ValueError(f'No FLOPs formula for model.family={cfg.family!r}.')
  matmul_params = active_layer_params(cfg) + cfg.d_model * cfg.vocab_size
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
  return 6.0 * matmul_params + attention
