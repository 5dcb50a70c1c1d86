"""Hugging Face config.json <-> ModelConfig for each supported architecture family."""

import dataclasses

from model.config import ModelConfig

DECODERS = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
            'qwen2': 'Qwen2ForCausalLM', 'mixtral': 'MixtralForCausalLM'}
# Families whose config.json `sliding_window` limits attention (Qwen2's is refused unless off).
WINDOWED = ('mistral', 'mixtral')
ENCODERS = ('bert', 'roberta')
SUPPORTED = (*DECODERS, 't5', *ENCODERS)
# Architectures whose folder holds the masked-LM head (others import the encoder alone).
MLM_ARCHITECTURES = ('BertForMaskedLM', 'BertForPreTraining', 'RobertaForMaskedLM')
ENCODER_ACTIVATIONS = {'gelu': 'gelu_exact', 'gelu_new': 'gelu', 'relu': 'relu'}


def _rope(hf: dict) -> tuple[float, dict]:
  """(theta, scaling fields) from either transformers 5's rope_parameters or the older keys."""
  params = dict(hf.get('rope_parameters') or {})
  legacy = dict(hf.get('rope_scaling') or {})
  params = {**legacy, **params}
  theta = params.get('rope_theta', hf.get('rope_theta', 10_000.0))
  kind = params.get('rope_type', params.get('type', 'default'))
  if kind == 'default':
    return theta, {}
  if kind != 'llama3':
    raise ValueError(f'config.json: RoPE scaling {kind!r} is not supported; seedling supports '
                     "the default rotary embedding and Llama 3.1's 'llama3' scaling.")
  return theta, dict(rope_scaling='llama3', rope_scaling_factor=params['factor'],
                     rope_low_freq_factor=params['low_freq_factor'],
                     rope_high_freq_factor=params['high_freq_factor'],
                     rope_original_max_len=params['original_max_position_embeddings'])


def _unsupported(hf: dict, path: str) -> None:
  """Refuses options that would silently change the function computed."""
  act = hf.get('hidden_act', 'silu')
  if act != 'silu':
    raise ValueError(f'{path}: hidden_act={act!r}; seedling maps only silu (SwiGLU).')
  for key in ('attention_bias', 'mlp_bias'):
    if hf.get(key) and hf['model_type'] != 'qwen2':
      raise ValueError(f'{path}: {key}=true is not supported (seedling has no bias there).')
  if hf['model_type'] == 'qwen2' and hf.get('use_sliding_window'):
    raise ValueError(f'{path}: use_sliding_window=true is not supported (full attention only).')


# HF feed_forward_proj -> activation ('gated-gelu' runs gelu_new, the tanh approximation).
T5_FEED_FORWARD = {'relu': 'relu', 'gated-gelu': 'geglu'}


def t5_rescales_logits(hf: dict) -> bool:
  """Whether a T5 config.json rescales logits by 1/sqrt(d_model) (original T5; v1.1 does not).

  transformers 5 writes tie_word_embeddings=true for every T5 and says this in
  `scale_decoder_outputs`; older configs of v1.1 say tie_word_embeddings=false.
  """
  return hf.get('scale_decoder_outputs', hf.get('tie_word_embeddings', True) is not False)


def t5_model_config(hf: dict, path: str) -> ModelConfig:
  """Original T5 (relu, tied embedding, logits rescaled) or T5 v1.1 (gated-GELU, no rescale:
  an lm_head, read from lm_head.weight or, where the folder has none, the shared embedding)."""
  ff = hf.get('feed_forward_proj', 'relu')
  if ff not in T5_FEED_FORWARD:
    raise ValueError(f'{path}: feed_forward_proj={ff!r} is not supported; supported: '
                     f'{sorted(T5_FEED_FORWARD)}.')
  layers = hf['num_layers']
  return ModelConfig(
      family='t5', vocab_size=hf['vocab_size'], d_model=hf['d_model'], num_layers=layers,
      num_encoder_layers=layers, num_decoder_layers=hf.get('num_decoder_layers') or layers,
      num_heads=hf['num_heads'], num_kv_heads=hf['num_heads'], head_dim=hf['d_kv'],
      mlp_dim=hf['d_ff'], activation=T5_FEED_FORWARD[ff],
      norm_eps=hf.get('layer_norm_epsilon', 1e-6), position_embedding='relative',
      relative_buckets=hf.get('relative_attention_num_buckets', 32),
      relative_max_distance=hf.get('relative_attention_max_distance', 128),
      scale_attention=False, tie_embeddings=t5_rescales_logits(hf))


def encoder_model_config(hf: dict, path: str) -> ModelConfig:
  """BERT / RoBERTa: post-LayerNorm encoder, learned absolute positions (RoBERTa's start after
  its padding id), token types, biases everywhere, and the MLM head when the folder has one
  (BertModel folders have none: their logits come from the tied embedding, a new head)."""
  kind, act = hf['model_type'], hf.get('hidden_act', 'gelu')
  positions = hf.get('position_embedding_type', 'absolute')
  mlm = any(a in MLM_ARCHITECTURES for a in hf.get('architectures') or ())
  problems = []
  if act not in ENCODER_ACTIVATIONS:
    problems.append(f'hidden_act={act!r} (supported: {sorted(ENCODER_ACTIVATIONS)})')
  if kind == 'roberta' and mlm and act != 'gelu':
    problems.append(f"hidden_act={act!r} with RoBERTa's MLM head (always exact gelu)")
  if positions != 'absolute':
    problems.append(f'position_embedding_type={positions!r} (only absolute)')
  if not hf.get('tie_word_embeddings', True):
    problems.append('tie_word_embeddings=false (the MLM decoder must be the word embedding)')
  if hf.get('is_decoder') or hf.get('add_cross_attention'):
    problems.append('is_decoder/add_cross_attention (encoder only)')
  if problems:
    raise ValueError(f'{path}: {kind} options not supported: ' + '; '.join(problems) + '.')
  heads = hf['num_attention_heads']
  return ModelConfig(
      family='encoder', vocab_size=hf['vocab_size'], d_model=hf['hidden_size'],
      num_layers=hf['num_hidden_layers'], num_heads=heads, num_kv_heads=heads,
      head_dim=hf['hidden_size'] // heads, mlp_dim=hf['intermediate_size'],
      activation=ENCODER_ACTIVATIONS[act], norm_eps=hf.get('layer_norm_eps', 1e-12),
      norm_type='layernorm', norm_position='post', use_bias=True, position_embedding='learned',
      max_positions=hf['max_position_embeddings'],
      position_offset=hf.get('pad_token_id', 1) + 1 if kind == 'roberta' else 0,
      type_vocab_size=hf.get('type_vocab_size', 2), embed_norm=True, mlm_head=mlm,
      tie_embeddings=not mlm)


def model_config(hf: dict, path: str = 'config.json', **overrides) -> ModelConfig:
  """ModelConfig equal in function to the Hugging Face `hf` config dict.

  Tied input/output embeddings become an untied lm_head holding a copy (seedling's tied
  output is scaled differently). `overrides` set any other ModelConfig field (e.g. dtype).
  """
  kind = hf.get('model_type')
  if kind == 't5':
    return dataclasses.replace(t5_model_config(hf, path), **overrides)
  if kind in ENCODERS:
    return dataclasses.replace(encoder_model_config(hf, path), **overrides)
  if kind not in DECODERS:
    raise ValueError(f'{path}: model_type={kind!r} is not supported; supported families: '
                     f'{sorted(SUPPORTED)}.')
  _unsupported(hf, path)
  heads = hf['num_attention_heads']
  theta, scaling = _rope(hf)
  fields = dict(
      family='decoder', vocab_size=hf['vocab_size'], d_model=hf['hidden_size'],
      num_layers=hf['num_hidden_layers'], num_heads=heads,
      num_kv_heads=hf.get('num_key_value_heads') or heads,
      head_dim=hf.get('head_dim') or hf['hidden_size'] // heads,
      mlp_dim=hf['intermediate_size'], activation='swiglu', norm_eps=hf['rms_norm_eps'],
      rope_theta=float(theta), tie_embeddings=False, qkv_bias=kind == 'qwen2',
      attention_window=(hf.get('sliding_window') or 0) if kind in WINDOWED else 0, **scaling)
  if kind == 'mixtral':
    fields.update(num_experts=hf['num_local_experts'], num_experts_per_tok=hf['num_experts_per_tok'],
                  router_score='softmax', renormalize=True, moe_dispatch='dropless',
                  load_balance_loss=hf.get('router_aux_loss_coef', 0.0), router_z_loss=0.0)
  return dataclasses.replace(ModelConfig(**fields), **overrides)


def hf_config(cfg: ModelConfig, dtype: str = 'float32') -> dict:
  """The Hugging Face config.json dict for a seedling decoder (Llama, Mistral with a sliding
  window, Qwen2 or Mixtral), T5 or BERT/RoBERTa encoder."""
  if cfg.family == 't5':
    return t5_hf_config(cfg, dtype)
  if cfg.family == 'encoder':
    return encoder_hf_config(cfg, dtype)
  if cfg.family != 'decoder':
    raise ValueError(f'Export supports the decoder, t5 and encoder families, not model.family='
                     f'{cfg.family!r}.')
  if cfg.activation != 'swiglu' or cfg.tie_embeddings:
    raise ValueError('Export needs model.activation=swiglu and model.tie_embeddings=False '
                     '(the Llama layout).')
  if cfg.num_experts and (cfg.num_shared_experts or cfg.first_dense_layers or cfg.moe_every != 1
                          or cfg.router_score != 'softmax' or not cfg.renormalize
                          or cfg.routed_scaling != 1.0 or cfg.expert_mlp_dim not in (0, cfg.mlp_dim)
                          or cfg.router_bias_update_rate):
    raise ValueError('Export of MoE needs the Mixtral layout: every layer MoE, softmax top-k '
                     'renormalized, no shared experts, no router bias, expert_mlp_dim=mlp_dim.')
  kind = ('mixtral' if cfg.num_experts else 'qwen2' if cfg.qkv_bias else
          'mistral' if cfg.attention_window else 'llama')
  if cfg.attention_window and kind not in WINDOWED:
    raise ValueError(f'Export of model.attention_window={cfg.attention_window} needs the Mistral '
                     'or Mixtral layout (Qwen2 configs window only their upper layers).')
  rope = {'rope_type': 'default', 'rope_theta': cfg.rope_theta}
  if cfg.rope_scaling == 'llama3':
    rope.update(rope_type='llama3', factor=cfg.rope_scaling_factor,
                low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_len)
  out = dict(
      architectures=[DECODERS[kind]], model_type=kind, vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, hidden_act='silu', rms_norm_eps=cfg.norm_eps,
      rope_theta=cfg.rope_theta, rope_parameters=rope, tie_word_embeddings=False,
      torch_dtype=dtype, dtype=dtype, max_position_embeddings=max(4096, cfg.rope_original_max_len))
  if cfg.rope_scaling == 'llama3':
    out['rope_scaling'] = dict(rope)
  if kind in WINDOWED:
    out['sliding_window'] = cfg.attention_window or None
  if kind == 'mixtral':
    out.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
               router_aux_loss_coef=cfg.load_balance_loss)
  return out


def t5_hf_config(cfg: ModelConfig, dtype: str) -> dict:
  """config.json of a T5ForConditionalGeneration equal to the seedling T5 `cfg`."""
  ff = {v: k for k, v in T5_FEED_FORWARD.items()}
  if (cfg.activation not in ff or cfg.position_embedding != 'relative' or cfg.scale_attention
      or cfg.num_kv_heads != cfg.num_heads):
    raise ValueError('T5 export needs model.position_embedding=relative, '
                     'scale_attention=False, num_kv_heads=num_heads and activation in '
                     f'{sorted(ff)}.')
  return dict(
      architectures=['T5ForConditionalGeneration'], model_type='t5', vocab_size=cfg.vocab_size,
      d_model=cfg.d_model, d_kv=cfg.head_dim, d_ff=cfg.mlp_dim, num_heads=cfg.num_heads,
      num_layers=cfg.num_encoder_layers or cfg.num_layers,
      num_decoder_layers=cfg.num_decoder_layers or cfg.num_layers,
      feed_forward_proj=ff[cfg.activation],
      layer_norm_epsilon=cfg.norm_eps, relative_attention_num_buckets=cfg.relative_buckets,
      relative_attention_max_distance=cfg.relative_max_distance,
      tie_word_embeddings=cfg.tie_embeddings, scale_decoder_outputs=cfg.tie_embeddings,
      is_encoder_decoder=True, decoder_start_token_id=0,
      pad_token_id=0, eos_token_id=1, torch_dtype=dtype, dtype=dtype)


def encoder_hf_config(cfg: ModelConfig, dtype: str) -> dict:
  """config.json of the BERT or RoBERTa (offset positions) encoder equal to `cfg`: a
  ...ForMaskedLM with the MLM head, else the bare ...Model."""
  acts = {v: k for k, v in ENCODER_ACTIVATIONS.items()}
  kind = 'roberta' if cfg.position_offset else 'bert'
  problems = [f'{key}={getattr(cfg, key)!r} (needs {want!r})' for key, want in (
      ('norm_type', 'layernorm'), ('norm_position', 'post'), ('use_bias', True),
      ('position_embedding', 'learned'), ('embed_norm', True), ('num_kv_heads', cfg.num_heads),
      ('head_dim', cfg.d_model // cfg.num_heads), ('tie_embeddings', not cfg.mlm_head))
      if getattr(cfg, key) != want]
  if cfg.activation not in acts:
    problems.append(f'activation={cfg.activation!r} (needs one of {sorted(acts)})')
  if kind == 'roberta' and cfg.mlm_head and cfg.activation != 'gelu_exact':
    problems.append("activation with RoBERTa's MLM head (always exact gelu: 'gelu_exact')")
  if problems:
    raise ValueError('Export of an encoder needs the BERT/RoBERTa layout: ' + '; '.join(problems)
                     + '.')
  name = {'bert': 'Bert', 'roberta': 'Roberta'}[kind]
  return dict(
      architectures=[f'{name}ForMaskedLM' if cfg.mlm_head else f'{name}Model'], model_type=kind,
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim,
      hidden_act=acts[cfg.activation], max_position_embeddings=cfg.max_positions,
      type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.norm_eps,
      pad_token_id=cfg.position_offset - 1 if kind == 'roberta' else 0,
      position_embedding_type='absolute', tie_word_embeddings=True, torch_dtype=dtype,
      dtype=dtype)
