"""Which Hugging Face tensors make each seedling parameter, and how (transpose, head split).

A `Rule` says, for one parameter of one layer (or a global one), which HF tensor names it
reads and two inverse functions: `load(list of HF arrays) -> seedling array` and
`save(seedling array) -> list of HF arrays`. Both use only methods that numpy arrays and
tracers share, so jax.eval_shape gives the expected HF shapes without touching data.
"""

import dataclasses
import re
from typing import Callable, Optional

import numpy as np

from model.config import ModelConfig

LAYER_KEY = re.compile(r'^(layers)(?:_(\d+))?$')   # scanned 'layers' or unrolled 'layers_3'


@dataclasses.dataclass(frozen=True)
class Rule:
  names: Callable[[int], list[str]]    # layer index -> HF tensor names (layer ignored if global)
  load: Callable[[list], np.ndarray]
  save: Callable[[np.ndarray], list]


def _linear(name):
  """HF Linear weight [out, in] <-> seedling kernel [in, out]."""
  return Rule(lambda i: [name(i)], lambda ws: ws[0].T, lambda k: [k.T])


def _identity(name):
  return Rule(lambda i: [name(i)], lambda ws: ws[0], lambda p: [p])


def _heads_in(name, heads, head_dim):
  """HF [heads*head_dim, d] <-> kernel [d, heads, head_dim] (HF's rotary halves need no permute)."""
  return Rule(lambda i: [name(i)], lambda ws: ws[0].T.reshape(-1, heads, head_dim),
              lambda k: [k.reshape(k.shape[0], heads * head_dim).T])


def _heads_bias(name, heads, head_dim):
  return Rule(lambda i: [name(i)], lambda ws: ws[0].reshape(heads, head_dim),
              lambda b: [b.reshape(heads * head_dim)])


def _heads_out(name, heads, head_dim):
  """HF o_proj [d, heads*head_dim] <-> kernel [heads, head_dim, d]."""
  return Rule(lambda i: [name(i)], lambda ws: ws[0].T.reshape(heads, head_dim, -1),
              lambda k: [k.reshape(heads * head_dim, k.shape[-1]).T])


def _experts(name, num_experts):
  """Per-expert HF Linear weights [out, in] <-> stacked kernel [experts, in, out]."""
  return Rule(lambda i: [name(i, e) for e in range(num_experts)],
              lambda ws: np.stack([w.T for w in ws]),
              lambda k: [k[e].T for e in range(num_experts)])


def _fused_experts(name, half: Optional[int], dim: int):
  """transformers 5's fused expert tensors (read only): gate_up_proj [E, 2F, d] or
  down_proj [E, d, F] -> [E, in, out]."""
  def load(ws):
    w = ws[0] if half is None else ws[0][:, half * dim:(half + 1) * dim]
    return w.transpose(0, 2, 1)
  return Rule(lambda i: [name(i)], load, None)


def layer_rules(cfg: ModelConfig, fused_experts: bool = False) -> dict[tuple, Rule]:
  """Rules for the parameters of one decoder layer, keyed by their path inside the layer."""
  h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  p = lambda suffix: (lambda i: f'model.layers.{i}.{suffix}')
  rules = {
      ('attn', 'query', 'kernel'): _heads_in(p('self_attn.q_proj.weight'), h, hd),
      ('attn', 'key', 'kernel'): _heads_in(p('self_attn.k_proj.weight'), kv, hd),
      ('attn', 'value', 'kernel'): _heads_in(p('self_attn.v_proj.weight'), kv, hd),
      ('attn', 'query', 'bias'): _heads_bias(p('self_attn.q_proj.bias'), h, hd),
      ('attn', 'key', 'bias'): _heads_bias(p('self_attn.k_proj.bias'), kv, hd),
      ('attn', 'value', 'bias'): _heads_bias(p('self_attn.v_proj.bias'), kv, hd),
      ('attn', 'out', 'kernel'): _heads_out(p('self_attn.o_proj.weight'), h, hd),
      ('attn_norm', 'scale'): _identity(p('input_layernorm.weight')),
      ('mlp_norm', 'scale'): _identity(p('post_attention_layernorm.weight')),
      ('mlp', 'wi_0', 'kernel'): _linear(p('mlp.gate_proj.weight')),
      ('mlp', 'wi_1', 'kernel'): _linear(p('mlp.up_proj.weight')),
      ('mlp', 'wo', 'kernel'): _linear(p('mlp.down_proj.weight')),
  }
  if fused_experts:
    rules.update({
        ('mlp', 'router'): _linear(p('mlp.gate.weight')),
        ('mlp', 'wi_0'): _fused_experts(p('mlp.experts.gate_up_proj'), 0, cfg.mlp_dim),
        ('mlp', 'wi_1'): _fused_experts(p('mlp.experts.gate_up_proj'), 1, cfg.mlp_dim),
        ('mlp', 'wo'): _fused_experts(p('mlp.experts.down_proj'), None, cfg.mlp_dim)})
  else:
    e = lambda w: (lambda i, x: f'model.layers.{i}.block_sparse_moe.experts.{x}.{w}.weight')
    rules.update({
        ('mlp', 'router'): _linear(p('block_sparse_moe.gate.weight')),
        ('mlp', 'wi_0'): _experts(e('w1'), cfg.num_experts),
        ('mlp', 'wi_1'): _experts(e('w3'), cfg.num_experts),
        ('mlp', 'wo'): _experts(e('w2'), cfg.num_experts)})
  return rules


def global_rules(tied: bool) -> dict[tuple, Rule]:
  """Embedding, final norm and output head (from the embedding when HF ties them)."""
  head = 'model.embed_tokens.weight' if tied else 'lm_head.weight'
  return {('embed', 'embedding'): _identity(lambda i: 'model.embed_tokens.weight'),
          ('final_norm', 'scale'): _identity(lambda i: 'model.norm.weight'),
          ('lm_head', 'kernel'): _identity(lambda i: head)}


def _attention(prefix, heads, head_dim):
  """seedling attention params <- HF T5 attention q/k/v/o under `prefix(i)`."""
  n = lambda w: (lambda i: f'{prefix(i)}.{w}.weight')
  return {('query', 'kernel'): _heads_in(n('q'), heads, head_dim),
          ('key', 'kernel'): _heads_in(n('k'), heads, head_dim),
          ('value', 'kernel'): _heads_in(n('v'), heads, head_dim),
          ('out', 'kernel'): _heads_out(n('o'), heads, head_dim)}


def t5_layer_rules(cfg: ModelConfig, stack: str) -> dict[tuple, Rule]:
  """One T5 block of `stack` ('encoder' | 'decoder'): HF `{stack}.block.{i}.layer.{j}`."""
  h, hd = cfg.num_heads, cfg.head_dim
  sub = lambda j, rest: (lambda i: f'{stack}.block.{i}.layer.{j}.{rest}')
  cross = stack == 'decoder'
  ff = 2 if cross else 1
  self_name = 'self_attn' if cross else 'attn'
  rules = {(self_name, *k): r for k, r in _attention(sub(0, 'SelfAttention'), h, hd).items()}
  rules[('attn_norm', 'scale')] = _identity(sub(0, 'layer_norm.weight'))
  if cross:
    rules.update({('cross_attn', *k): r
                  for k, r in _attention(sub(1, 'EncDecAttention'), h, hd).items()})
    rules[('cross_norm', 'scale')] = _identity(sub(1, 'layer_norm.weight'))
  rules[('mlp_norm', 'scale')] = _identity(sub(ff, 'layer_norm.weight'))
  for name in ('wi', 'wi_0', 'wi_1', 'wo'):
    rules[('mlp', name, 'kernel')] = _linear(sub(ff, f'DenseReluDense.{name}.weight'))
  return rules


def t5_global_rules(tied: bool) -> dict[tuple, Rule]:
  """Embedding, final norms, relative position tables and the lm_head (from the embedding
  when the folder has no lm_head.weight)."""
  bias = lambda stack: f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight'
  return {('embed', 'embedding'): _identity(lambda i: 'shared.weight'),
          ('encoder', 'final_norm', 'scale'): _identity(lambda i: 'encoder.final_layer_norm.weight'),
          ('decoder', 'final_norm', 'scale'): _identity(lambda i: 'decoder.final_layer_norm.weight'),
          ('encoder', 'relpos', 'rel_embedding'): _identity(lambda i: bias('encoder')),
          ('decoder', 'relpos', 'rel_embedding'): _identity(lambda i: bias('decoder')),
          ('decoder', 'lm_head', 'kernel'): _identity(
              lambda i: 'shared.weight' if tied else 'lm_head.weight')}


def encoder_layer_rules(cfg: ModelConfig, prefix: str) -> dict[tuple, Rule]:
  """One BERT/RoBERTa layer: HF `{prefix}encoder.layer.{i}` (post-LayerNorm, biased)."""
  h, hd = cfg.num_heads, cfg.head_dim
  p = lambda rest: (lambda i: f'{prefix}encoder.layer.{i}.{rest}')
  rules = {('attn', 'out', 'kernel'): _heads_out(p('attention.output.dense.weight'), h, hd),
           ('attn', 'out', 'bias'): _identity(p('attention.output.dense.bias')),
           ('attn_norm', 'scale'): _identity(p('attention.output.LayerNorm.weight')),
           ('attn_norm', 'bias'): _identity(p('attention.output.LayerNorm.bias')),
           ('mlp', 'wi', 'kernel'): _linear(p('intermediate.dense.weight')),
           ('mlp', 'wi', 'bias'): _identity(p('intermediate.dense.bias')),
           ('mlp', 'wo', 'kernel'): _linear(p('output.dense.weight')),
           ('mlp', 'wo', 'bias'): _identity(p('output.dense.bias')),
           ('mlp_norm', 'scale'): _identity(p('output.LayerNorm.weight')),
           ('mlp_norm', 'bias'): _identity(p('output.LayerNorm.bias'))}
  for name in ('query', 'key', 'value'):
    rules[('attn', name, 'kernel')] = _heads_in(p(f'attention.self.{name}.weight'), h, hd)
    rules[('attn', name, 'bias')] = _heads_bias(p(f'attention.self.{name}.bias'), h, hd)
  return rules


# HF names of the MLM head's dense, its LayerNorm and the decoder bias, per model_type.
MLM_HEADS = {'bert': ('cls.predictions.transform.dense', 'cls.predictions.transform.LayerNorm',
                      'cls.predictions.bias'),
             'roberta': ('lm_head.dense', 'lm_head.layer_norm', 'lm_head.bias')}


def encoder_global_rules(prefix: str, model_type: str) -> dict[tuple, Rule]:
  """Embeddings (words, positions, token types, their LayerNorm) and the MLM head."""
  e = lambda rest: _identity(lambda i: f'{prefix}embeddings.{rest}')
  dense, norm, bias = MLM_HEADS[model_type]
  return {('embed', 'embedding'): e('word_embeddings.weight'),
          ('encoder', 'pos_embed', 'embedding'): e('position_embeddings.weight'),
          ('encoder', 'type_embed', 'embedding'): e('token_type_embeddings.weight'),
          ('encoder', 'embed_norm', 'scale'): e('LayerNorm.weight'),
          ('encoder', 'embed_norm', 'bias'): e('LayerNorm.bias'),
          ('mlm_head', 'dense', 'kernel'): _linear(lambda i: f'{dense}.weight'),
          ('mlm_head', 'dense', 'bias'): _identity(lambda i: f'{dense}.bias'),
          ('mlm_head', 'norm', 'scale'): _identity(lambda i: f'{norm}.weight'),
          ('mlm_head', 'norm', 'bias'): _identity(lambda i: f'{norm}.bias'),
          ('mlm_head', 'bias'): _identity(lambda i: bias)}


def resolve(path: tuple, cfg: ModelConfig, tied: bool = False, fused_experts: bool = False,
            prefix: str = '', model_type: str = 'bert'
            ) -> tuple[Optional[str], Optional[int], Rule]:
  """(kind, layer, rule) for a seedling parameter path: kind 'scanned' (leading layer axis),
  'layer' (unrolled layer `layer`) or None (global). Encoders read the HF names of
  `model_type` under `prefix` ('bert.' in BertForMaskedLM folders, '' in BertModel ones)."""
  if cfg.family in ('t5', 'encoder'):
    match = LAYER_KEY.match(path[1]) if len(path) > 1 else None
    if match and cfg.family == 'encoder':
      rules, inner = encoder_layer_rules(cfg, prefix), path[2:]
    elif match:
      rules, inner = t5_layer_rules(cfg, path[0]), path[2:]
    else:
      rules = (encoder_global_rules(prefix, model_type) if cfg.family == 'encoder'
               else t5_global_rules(tied))
      inner = path
  else:
    match = LAYER_KEY.match(path[0])
    rules, inner = global_rules(tied), path
    if match:
      inner = path[1:]
      if cfg.num_experts:
        if cfg.moe_every != 1 or cfg.first_dense_layers or inner[0] != 'moe':
          raise ValueError('Hugging Face conversion supports MoE models with every layer MoE '
                           '(Mixtral); set model.moe_every=1 and model.first_dense_layers=0.')
        inner = inner[1:]
      rules = layer_rules(cfg, fused_experts)
  if not match:
    kind, layer = None, None
  else:
    kind = 'scanned' if match.group(2) is None else 'layer'
    layer = None if match.group(2) is None else int(match.group(2))
  if inner not in rules:
    raise ValueError(f'Parameter {"/".join(path)} has no Hugging Face counterpart; the '
                     'converter covers the Llama/Qwen2/Mistral/Mixtral, T5 and BERT/RoBERTa '
                     'layouts.')
  return kind, layer, rules[inner]
