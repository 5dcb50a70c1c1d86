"""LoRA adapters: fresh ones change nothing, the unmerged forward equals the merged model's,
adapters carry their kernel's logical axes, and target names that match no projection are
refused naming the key. Weights are drawn from shapes (no init is compiled)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ModelConfig, build_model
from model.decoding import decoder_generate
from model.hf import abstract_params
from model.flops import flops_per_token
from model.lora import base_config, is_adapter, merge_lora
from model.param_tree import combine, partition
from tests.model.test_t5 import MODEL_KEYS, seq2seq_batch

SMALL = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
             mlp_dim=48, lora_rank=4, lora_alpha=8.0)
CONFIGS = {
    'decoder': ModelConfig(**SMALL, lora_targets='query,key,value,out,wi_0,wi_1,wo'),
    # a leading dense layer and a shared expert: the MoE decoder's projections outside experts
    'moe': ModelConfig(**dict(SMALL, num_layers=3), num_experts=4, first_dense_layers=1,
                       num_shared_experts=1, lora_targets='query,value,out,wi_0,wo'),
    't5': ModelConfig(**SMALL, family='t5', num_decoder_layers=3, activation='geglu',
                      position_embedding='relative', scale_attention=False, relative_buckets=8,
                      relative_max_distance=16, lora_targets='query,key,value,out,wi_1,wo'),
    # unrolled layers, and the MLM head's dense projection
    'encoder': ModelConfig(**SMALL, family='encoder', mlm_head=True, scan_layers=False,
                           activation='gelu', lora_targets='query,value,wi,wo,dense'),
}


def _inputs(cfg):
  if cfg.family == 't5':
    batch = seq2seq_batch(2, 9, 7, cfg.vocab_size)
    return tuple(batch[k] for k in MODEL_KEYS)
  ids = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 8)).astype(np.int32)
  positions = np.broadcast_to(np.arange(8, dtype=np.int32), ids.shape)
  return ids, positions, np.array([[1] * 8, [1] * 5 + [0] * 3], np.int32)


def _draw(shapes, seed):
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype), shapes)


def _forward(cfg):
  model = build_model(cfg)
  inputs = _inputs(cfg)
  return jax.jit(lambda params: model.apply({'params': params}, *inputs))


@pytest.mark.parametrize('family', list(CONFIGS))
def test_zero_b_is_the_base_model_and_the_merged_model_is_the_adapted_one(family):
  cfg = CONFIGS[family]
  adapters, base = partition(_draw(abstract_params(cfg), 0), is_adapter)
  assert adapters, 'no adapter was created'
  lora_forward, base_forward = _forward(cfg), _forward(base_config(cfg))
  want = base_forward(base)
  fresh = jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.zeros_like(a) if path[-1].key == 'lora_b' else a, adapters)
  np.testing.assert_array_equal(lora_forward(combine(base, fresh)), want)

  params = combine(base, adapters)   # random B: the adapters now change the function
  adapted = lora_forward(params)
  assert np.abs(adapted - want).max() > 1e-2
  merged, merged_cfg = merge_lora(params, cfg)
  assert merged_cfg == base_config(cfg)
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  np.testing.assert_allclose(base_forward(merged), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('family', list(CONFIGS))
def test_qlora_projections_are_nf4_and_merge_to_their_dequantized_model(family):
  cfg = dataclasses.replace(CONFIGS[family], lora_quant='nf4', lora_quant_block=8)
  abstract = abstract_params(cfg)
  paths = [tuple(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract)]
  float_kernels = [p for p, _ in _leaves(abstract_params(dataclasses.replace(cfg, lora_quant='')))
                   if p[-1] == 'kernel']
  # every projection kernel is stored as codes + absmax; only output heads stay float
  assert [p for p in paths if p[-1] == 'kernel'] == [
      p for p in float_kernels if 'lm_head' in p]
  assert sum(p[-1] == 'kernel_nf4' for p in paths) == len(float_kernels) - sum(
      'lm_head' in p for p in float_kernels) > 0
  rng = np.random.RandomState(0)
  params = jax.tree.map(
      lambda s: jnp.asarray(rng.randint(0, 256, s.shape) if s.dtype == jnp.uint8
                            else np.abs(rng.normal(0, 0.2, s.shape)), s.dtype), abstract)
  adapted = _forward(cfg)(params)
  merged, merged_cfg = merge_lora(params, cfg)
  assert merged_cfg == base_config(dataclasses.replace(cfg, lora_quant=''))
  np.testing.assert_allclose(_forward(merged_cfg)(merged), adapted, atol=1e-5, rtol=1e-5)


def _leaves(tree):
  return [(tuple(k.key for k in p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


@pytest.mark.parametrize('family', list(CONFIGS))
def test_adapter_dropout_acts_in_training_only_and_on_the_adapters_only(family):
  cfg = dataclasses.replace(CONFIGS[family], lora_dropout=0.5)
  params = _draw(abstract_params(cfg), 0)
  model, inputs = build_model(cfg), _inputs(cfg)
  run = jax.jit(lambda p, rng, deterministic: model.apply(
      {'params': p}, *inputs, deterministic=deterministic, rngs={'dropout': rng}),
      static_argnums=2)
  want = _forward(dataclasses.replace(cfg, lora_dropout=0.0))(params)
  np.testing.assert_array_equal(run(params, jax.random.key(0), True), want)
  dropped = run(params, jax.random.key(0), False)
  assert np.abs(dropped - want).max() > 1e-3
  assert np.abs(dropped - run(params, jax.random.key(1), False)).max() > 1e-3
  adapters, base = partition(params, is_adapter)
  zero_b = jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.zeros_like(a) if path[-1].key == 'lora_b' else a, adapters)
  np.testing.assert_allclose(run(combine(base, zero_b), jax.random.key(0), False),
                             _forward(base_config(cfg))(base), atol=1e-6)


def test_kv_cached_decoding_with_adapters_equals_the_merged_model():
  cfg = CONFIGS['decoder']
  params = _draw(abstract_params(cfg), 0)
  merged, merged_cfg = merge_lora(params, cfg)
  prompt, _, _ = _inputs(cfg)
  lengths = np.array([8, 5])
  prompt[1] = np.roll(prompt[1], 3)   # left-padded second row

  def generate(model_cfg, model_params):
    model = build_model(model_cfg)
    return jax.jit(lambda p: decoder_generate(model, p, prompt, lengths, jax.random.key(0),
                                              steps=4))(model_params)

  tokens, logprobs = generate(cfg, params)
  want_tokens, want_logprobs = generate(merged_cfg, merged)
  np.testing.assert_array_equal(tokens, want_tokens)
  np.testing.assert_allclose(logprobs, want_logprobs, atol=1e-5)


def test_adapters_carry_the_kernels_logical_axes_and_the_layers_axis():
  cfg = dataclasses.replace(CONFIGS['decoder'], lora_targets='query')
  boxed = jax.eval_shape(lambda: build_model(cfg).init(jax.random.key(0), *_inputs(cfg))['params'])
  query = boxed['layers']['attn']['query']
  assert query['kernel'].names == ('layers', 'embed', 'heads', 'head_dim')
  assert query['lora_a'].names == ('layers', 'embed', None)
  assert query['lora_b'].names == ('layers', None, 'heads', 'head_dim')
  assert nn.meta.unbox(query['lora_a']).shape == (2, 32, 4)
  assert nn.meta.unbox(query['lora_b']).shape == (2, 4, 4, 8)
  assert 'lora_a' not in boxed['layers']['attn']['key']   # not a target


def test_unknown_or_missing_targets_are_refused_naming_the_key():
  cfg = CONFIGS['decoder']
  with pytest.raises(ValueError, match=r"model.lora_targets=.*\['wq'\] match no projection.*"
                                       r"valid names: \['key', 'out', 'query', 'value', "
                                       r"'wi_0', 'wi_1', 'wo'\]"):
    build_model(dataclasses.replace(cfg, lora_targets='query,wq'))
  with pytest.raises(ValueError, match=r"\['wi_1'\] match no projection"):   # experts are not
    build_model(dataclasses.replace(CONFIGS['moe'], first_dense_layers=0, num_layers=2,
                                    num_shared_experts=0, lora_targets='query,wi_1'))
  with pytest.raises(ValueError, match='model.lora_rank=4 needs model.lora_targets'):
    build_model(dataclasses.replace(cfg, lora_targets=''))
  with pytest.raises(ValueError, match="model.lora_targets='query' needs model.lora_rank > 0"):
    build_model(dataclasses.replace(cfg, lora_rank=0, lora_targets='query'))


def test_model_flops_skip_the_frozen_kernels_weight_gradients():
  """Under LoRA the base kernels get no weight gradient: 2 FLOPs per kernel parameter fewer
  per token (counted from the real parameter tree: every kernel but the embedding table)."""
  cfg = CONFIGS['decoder']
  base = partition(abstract_params(cfg), is_adapter)[1]
  kernels = sum(int(np.prod(leaf.shape)) for path, leaf in
                jax.tree_util.tree_leaves_with_path(base)
                if getattr(path[-1], 'key', None) == 'kernel')
  full = flops_per_token(base_config(cfg), 8)
  assert flops_per_token(cfg, 8) == full - 2 * kernels
  assert kernels < full / 6   # not a vacuous count
