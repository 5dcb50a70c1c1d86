"""Model FLOPs per trained token (forward + backward), the numerator of MFU.

Convention (PaLM appendix B): 6 x matmul parameters the token passes through (embedding lookup
excluded, LM head included) + 12 x layers x attention width x sequence length for the
attention score and value products, counted in full even under a causal mask (a decoder's
sliding window, model.attention_window, caps the length). With LoRA
(model.lora_rank > 0) the base kernels are frozen, so their weight-gradient products are not
computed: 4 x instead of 6 x. The adapters' own products (2 x rank / width of a projection's)
are left out, as norms are.
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


def flops_per_token(cfg: ModelConfig, seq_len: int, target_len: int = 0) -> float:
  """Training FLOPs per token of `cfg` at `seq_len` (the encoder length of a 't5' model).

  For 't5' the token is an encoder token: the decoder's `target_len` tokens per row are counted
  in, scaled by target_len / seq_len (0 = as many as the encoder's).
  """
  width = cfg.num_heads * cfg.head_dim
  per_param = 4.0 if cfg.lora_rank else 6.0   # forward, input gradient (, weight gradient)
  if cfg.family == 'decoder':
    matmul_params = active_layer_params(cfg) + cfg.d_model * cfg.vocab_size
    attended = min(seq_len, cfg.attention_window) if cfg.attention_window else seq_len
    return per_param * matmul_params + 12 * cfg.num_layers * width * attended
  if cfg.family not in ('encoder', 't5'):
    raise ValueError(f'No FLOPs formula for model.family={cfg.family!r}.')
  enc_layers = cfg.num_encoder_layers or cfg.num_layers
  encoder = (per_param * (enc_layers * decoder_layer_params(cfg) + cfg.d_model * cfg.vocab_size)
             + 12 * enc_layers * width * seq_len)
  if cfg.family == 'encoder':
    return encoder
  encoder -= per_param * cfg.d_model * cfg.vocab_size   # the encoder has no output head
  target_len = target_len or seq_len
  dec_layers = cfg.num_decoder_layers or cfg.num_layers
  cross_q_out = 2 * cfg.d_model * cfg.head_dim * cfg.num_heads
  # Cross-attention keys/values are projected once per encoder token, not per decoder token.
  cross_kv = 2 * cfg.d_model * cfg.head_dim * cfg.num_kv_heads
  decoder_token = (per_param * (dec_layers * (decoder_layer_params(cfg) + cross_q_out)
                          + cfg.d_model * cfg.vocab_size)
                   + 12 * dec_layers * width * (target_len + seq_len))
  return encoder + per_param * dec_layers * cross_kv + decoder_token * target_len / seq_len
