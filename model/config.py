"""Model hyperparameters as one frozen dataclass, built from the `model` config section."""

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of every model family; a family reads the fields it needs.

  The `model` section of every config is exactly these fields (configs/base.py builds it
  from the defaults here), so each knob is declared and documented once.
  """

  family: str = 'decoder'         # model family: 'decoder' | 't5' | 'encoder' (model.FAMILIES)
  vocab_size: int = 512           # embedding rows / logits; must hold the tokenizer's vocabulary
  d_model: int = 128              # residual stream width
  num_layers: int = 2             # decoder layers
  num_heads: int = 4              # query heads
  num_kv_heads: int = 2           # key/value heads: = num_heads MHA, 1 MQA, in between GQA
  head_dim: int = 32              # width of one attention head
  mlp_dim: int = 384              # feed-forward hidden width
  activation: str = 'swiglu'      # swiglu | geglu (gated) | relu | gelu (tanh) | gelu_exact (erf)
  norm_eps: float = 1e-6          # norm epsilon (RMSNorm and LayerNorm)
  norm_type: str = 'rms'          # 'rms' (RMSNorm) | 'layernorm' (mean-subtracted, with bias; BERT)
  rope_theta: float = 10_000.0    # rotary embedding base
  rope_scaling: str = ''          # rotary frequency scaling: '' (none) | 'llama3' (Llama 3.1)
  rope_scaling_factor: float = 1.0  # llama3 scaling: long-wavelength frequencies divided by this
  rope_low_freq_factor: float = 1.0  # llama3 scaling: wavelengths > original_len/this are scaled
  rope_high_freq_factor: float = 4.0  # llama3 scaling: wavelengths < original_len/this are kept
  rope_original_max_len: int = 8192  # llama3 scaling: context length of pretraining
  tie_embeddings: bool = False    # logits from the input embedding (scaled by 1/sqrt(d_model))
  qkv_bias: bool = False          # biases on query/key/value projections (Qwen2-style)
  use_bias: bool = False          # biases on every attention and MLP projection (BERT/RoBERTa)
  dtype: str = 'float32'          # compute dtype of activations and matmuls
  param_dtype: str = 'float32'    # storage dtype of parameters (and optimizer moments)
  scan_layers: bool = True        # nn.scan over layers (one compiled layer) or unrolled
  remat_policy: str = 'none'      # rematerialisation: 'none' | 'full' | 'dots' | 'dots_no_batch'
  attention_impl: str = 'xla'     # 'xla' | 'cudnn' (GPU) | 'pallas' (TPU) | 'pallas_interpret'
  matmul_impl: str = 'xla'        # 'xla' | 'blas' (MKL; one CPU device, f32) | 'auto' (either)
  attention_block_size: int = 512  # pallas: query/key tile, a multiple of 128 (gcd with length)
  attention_query_block: int = 64  # xla: query rows per block; causal blocks skip later keys
  attention_window: int = 0       # causal self-attention sees only the latest N keys; 0 = all
  dropout_rate: float = 0.0       # residual dropout while training
  num_experts: int = 0            # MoE: routed experts per MoE layer; 0 = dense model
  num_experts_per_tok: int = 2    # MoE: experts each token is routed to (top-k)
  num_shared_experts: int = 0     # MoE: always-on experts per MoE layer (DeepSeek-style)
  expert_mlp_dim: int = 0         # MoE: hidden width of one expert; 0 = mlp_dim
  first_dense_layers: int = 0     # MoE: leading layers that keep the dense MLP
  moe_every: int = 1              # MoE: after those, every moe_every-th layer is MoE (1 = all)
  router_score: str = 'softmax'   # MoE: router scores 'softmax' | 'sigmoid'
  renormalize: bool = True        # MoE: top-k combine weights rescaled to sum to 1
  routed_scaling: float = 1.0     # MoE: factor on the routed experts' combined output
  moe_dispatch: str = 'dropless'  # MoE: 'dropless' (grouped matmul) | 'capacity' (drops overflow)
  capacity_factor: float = 1.25   # MoE capacity dispatch: slots per expert / (k * tokens / experts)
  moe_grouped_matmul: str = 'auto'  # MoE dropless: ragged_dot | blocked | auto (GPU/TPU: ragged)
  moe_block_size: int = 64        # MoE 'blocked': rows per matmul; expert rows pad to a multiple
  moe_exchange_factor: float = 0.0  # MoE dropless a2a: room / mean pairs (drops overflow); 0 = all
  load_balance_loss: float = 0.01  # MoE: coefficient of the Switch load-balancing loss
  router_z_loss: float = 0.001    # MoE: coefficient of the router z-loss
  router_bias_update_rate: float = 0.0  # MoE: DeepSeek-V3 aux-loss-free bias step; 0 = off
  num_encoder_layers: int = 0     # t5/encoder: encoder layers; 0 = num_layers
  num_decoder_layers: int = 0     # t5: decoder layers; 0 = num_layers
  position_embedding: str = 'rope'  # t5/encoder: 'rope' | 'relative' (T5 bias) | 'learned' (BERT)
  max_positions: int = 512        # encoder 'learned' positions: rows of the position table
  position_offset: int = 0        # encoder 'learned' positions: table row of position 0 (RoBERTa 2)
  type_vocab_size: int = 0        # encoder: token-type (sentence A/B) embedding rows; 0 = none
  embed_norm: bool = False        # encoder: norm of the summed embeddings (BERT)
  norm_position: str = 'pre'      # encoder: 'pre' x+f(norm(x)), final norm | 'post' norm(x+f(x))
  mlm_head: bool = False          # encoder: BERT head dense+act+norm, tied decoder with a bias
  relative_buckets: int = 32      # relative position bias: buckets per direction pair (T5: 32)
  relative_max_distance: int = 128  # relative position bias: distances beyond share the last bucket
  scale_attention: bool = True    # logits / sqrt(head_dim); T5 leaves logits unscaled (False)
  lora_rank: int = 0              # LoRA: rank of adapters on model.lora_targets; 0 = off
  lora_alpha: float = 16.0        # LoRA: adapter output scale = lora_alpha / lora_rank
  lora_targets: str = ''          # LoRA: comma-separated projection names (model/lora.py)
  lora_dropout: float = 0.0       # LoRA: dropout on each adapter's input while training
  lora_quant: str = ''            # QLoRA: '' | 'nf4' (every projection kernel frozen in 4 bits)
  lora_quant_block: int = 64      # QLoRA: weights per absmax block, along the last input axis

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> 'ModelConfig':
    """Builds the config, naming any key this dataclass does not know."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f'Unknown model config keys {unknown}; known keys: {sorted(known)}.')
    return cls(**values)

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)
