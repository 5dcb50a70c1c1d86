"""MoE block: both dispatches against a dense every-expert reference, exact drops, aux-loss
formula, layer patterns, and sharded (expert-parallel) runs equal to one device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import meta

from model import ModelConfig, build_model
from model.flops import active_layer_params
from model.moe import MOE_COLLECTION, MoE, capacity, load_balance_loss, moe_metrics
from tests.helpers import packed_batch, partitioner, tiny_config
from train.objectives import build_objective
from train.optimizer import with_surrogate_updates

CFG = ModelConfig(d_model=16, mlp_dim=24, num_experts=4, num_experts_per_tok=2,
                  num_shared_experts=1, expert_mlp_dim=8)


def _setup(cfg, shape=(2, 12)):
  x = jax.random.normal(jax.random.key(1), shape + (cfg.d_model,))
  params = meta.unbox(MoE(cfg).init(jax.random.key(0), x)['params'])
  return x, params


def _apply(cfg, params, x):
  out, stats = MoE(cfg).apply({'params': params}, x, mutable=[MOE_COLLECTION])
  return out, moe_metrics(stats)


def _reference(cfg, p, x, keep=None):
  """Every expert on every token, combined with the top-k router weights (pairs not in `keep`
  [B, L, k] get weight 0), plus the shared experts."""
  logits = x @ p['router']
  scores = jax.nn.softmax(logits) if cfg.router_score == 'softmax' else jax.nn.sigmoid(logits)
  weights, ids = jax.lax.top_k(scores, cfg.num_experts_per_tok)
  if cfg.renormalize:
    weights = weights / weights.sum(-1, keepdims=True)
  if keep is not None:
    weights = weights * keep
  combine = jnp.zeros(scores.shape).at[
      jnp.arange(x.shape[0])[:, None, None], jnp.arange(x.shape[1])[None, :, None], ids].set(
          weights * cfg.routed_scaling)
  h = jax.nn.silu(jnp.einsum('bld,edf->blef', x, p['wi_0'])) * jnp.einsum(
      'bld,edf->blef', x, p['wi_1'])
  every = jnp.einsum('blef,efd->bled', h, p['wo'])
  s = p['shared']
  shared = (jax.nn.silu(x @ s['wi_0']['kernel']) * (x @ s['wi_1']['kernel'])) @ s['wo']['kernel']
  return jnp.einsum('bled,ble->bld', every, combine) + shared, ids


@pytest.mark.parametrize('score,renormalize,scaling', [('softmax', True, 1.0),
                                                       ('sigmoid', False, 2.5)])
def test_dropless_equals_dense_every_expert_reference(score, renormalize, scaling):
  cfg = dataclasses.replace(CFG, router_score=score, renormalize=renormalize,
                            routed_scaling=scaling)
  x, params = _setup(cfg)
  out, metrics = _apply(cfg, params, x)
  expected, _ = _reference(cfg, params, x)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
  assert float(metrics['moe_dropped'][0]) == 0.0
  loads = [float(metrics[f'moe_load_e{i:02d}'][0]) for i in range(cfg.num_experts)]
  assert abs(sum(loads) - 1.0) < 1e-6
  expected_aux = (cfg.load_balance_loss * metrics['moe_load_balance'][0]
                  + cfg.router_z_loss * metrics['moe_router_z'][0])
  np.testing.assert_allclose(metrics['moe_aux_loss'][0], expected_aux, rtol=1e-6)


def test_capacity_with_room_for_all_equals_dropless():
  x, params = _setup(CFG)
  roomy = dataclasses.replace(CFG, moe_dispatch='capacity', capacity_factor=CFG.num_experts)
  out, metrics = _apply(roomy, params, x)
  np.testing.assert_allclose(out, _apply(CFG, params, x)[0], atol=1e-5, rtol=1e-5)
  assert float(metrics['moe_dropped'][0]) == 0.0


def test_small_capacity_drops_exactly_the_overflow_pairs():
  cfg = dataclasses.replace(CFG, moe_dispatch='capacity', capacity_factor=0.5)
  x, params = _setup(cfg)
  _, ids = _reference(cfg, params, x)
  ids = np.asarray(ids)
  cap = capacity(cfg, x.shape[1])
  assert cap == 3
  # Within a sequence, first choices of all tokens come before second choices, in token order.
  keep = np.zeros(ids.shape, np.float32)
  for b in range(ids.shape[0]):
    taken = [0] * cfg.num_experts
    for j in range(ids.shape[2]):
      for t in range(ids.shape[1]):
        keep[b, t, j] = taken[ids[b, t, j]] < cap
        taken[ids[b, t, j]] += 1
  assert 0 < keep.sum() < keep.size
  out, metrics = _apply(cfg, params, x)
  np.testing.assert_allclose(out, _reference(cfg, params, x, keep)[0], atol=1e-5, rtol=1e-5)
  dropped, routed = metrics['moe_dropped']
  assert (float(dropped), float(routed)) == (keep.size - keep.sum(), keep.size)


def test_load_balance_loss_matches_its_formula_on_hand_built_routing():
  # 4 tokens, 4 experts, top-1: experts 0, 0, 1, 2 chosen -> f = (1/2, 1/4, 1/4, 0).
  scores = jnp.array([[.7, .1, .1, .1], [.4, .3, .2, .1], [.1, .6, .2, .1], [.2, .1, .6, .1]])
  ids = jnp.array([[0], [0], [1], [2]])
  p = scores.mean(0)                                  # (0.35, 0.275, 0.275, 0.1)
  expected = 4 * (0.5 * p[0] + 0.25 * p[1] + 0.25 * p[2] + 0 * p[3])
  np.testing.assert_allclose(load_balance_loss(scores, ids, 4), expected, rtol=1e-6)
  np.testing.assert_allclose(expected, 4 * (0.175 + 0.06875 + 0.06875), rtol=1e-6)
  # Uniform routing and uniform probabilities give exactly 1.
  np.testing.assert_allclose(load_balance_loss(jnp.full((4, 4), .25), jnp.arange(4)[:, None], 4),
                             1.0, rtol=1e-6)


def test_moe_metrics_reduce_scanned_and_unrolled_layers():
  # Sown layout of 2 scanned MoE layers plus 1 unrolled one (each sow is a 1-tuple).
  def layer(n, aux, load, dropped):
    return {'aux_loss': (jnp.full((n,), aux),), 'load_balance': (jnp.full((n,), 1.0),),
            'router_z': (jnp.full((n,), 2.0),), 'load': (jnp.tile(jnp.array(load), (n, 1)),),
            'dropped': (jnp.full((n,), dropped),), 'routed': (jnp.full((n,), 8.0),)}
  stats = {'layers': {'moe': {'mlp': layer(2, 0.5, [0.75, 0.25], 1.0)}},
           'layers_2': {'mlp': layer(1, 0.25, [0.0, 1.0], 2.0)}}
  m = moe_metrics(stats)
  assert float(m['moe_aux_loss'][0]) == 1.25 and float(m['moe_aux_loss'][1]) == 1.0
  assert (float(m['moe_router_z'][0]), float(m['moe_router_z'][1])) == (6.0, 3.0)
  assert (float(m['moe_load_e00'][0]), float(m['moe_load_e01'][0])) == (1.5, 1.5)
  assert (float(m['moe_dropped'][0]), float(m['moe_dropped'][1])) == (4.0, 24.0)
  assert moe_metrics({}) == {}


@pytest.mark.parametrize('dense,every,moe_layers', [(0, 1, 4), (1, 3, 1), (2, 2, 1)])
def test_layer_patterns_scan_and_place_moe_layers(dense, every, moe_layers):
  cfg = dataclasses.replace(CFG, vocab_size=32, num_layers=4, num_heads=2, num_kv_heads=1,
                            head_dim=8, first_dense_layers=dense, moe_every=every)
  batch = packed_batch(1, 8, cfg.vocab_size)
  params = meta.unbox(jax.eval_shape(build_model(cfg).init, jax.random.key(0), batch['inputs'],
                                     batch['positions'], batch['segment_ids'])['params'])
  experts = params['layers']['moe']['mlp']['wi_0']
  assert experts.shape == (moe_layers, cfg.num_experts, cfg.d_model, cfg.expert_mlp_dim)
  assert ('dense_layers' in params) == (dense > 0)
  dense_cfg = dataclasses.replace(cfg, num_experts=0)
  # Active parameters: each MoE layer swaps mlp_dim for (k + shared) experts and a router.
  per_layer_gap = (3 * cfg.d_model * (cfg.mlp_dim - 3 * cfg.expert_mlp_dim)
                   - cfg.d_model * cfg.num_experts)
  assert active_layer_params(dense_cfg) - active_layer_params(cfg) == moe_layers * per_layer_gap
  with pytest.raises(ValueError, match='moe_every'):
    jax.eval_shape(build_model(dataclasses.replace(cfg, moe_every=3, first_dense_layers=0)).init,
                   jax.random.key(0), batch['inputs'], batch['positions'], batch['segment_ids'])


def _loss_and_grads(part, objective, params, batch):
  _, shardings = part.abstract(objective.init_fn, jax.random.key(0))
  params = jax.device_put(params, shardings)
  batch = jax.device_put(batch, part.batch_sharding)

  def fn(p, b):
    def loss(p):
      metrics = objective.loss_fn(p, b, jax.random.key(1), train=True)
      return metrics['loss'][0], metrics
    return jax.grad(loss, has_aux=True)(p)

  grads, metrics = part.jit(fn, in_shardings=(shardings, part.batch_sharding),
                            out_shardings=(shardings, part.replicated))(params, batch)
  return grads, metrics, params


# Each dispatch on one of the two meshes keeps the compiles (the cost of this test) to four.
@pytest.mark.parametrize('dispatch,axes', [('capacity', dict(expert=4, data=2)),
                                           ('dropless', dict(expert=2, fsdp=2, tensor=2))],
                         ids=str)
def test_expert_parallel_mesh_equals_one_device(dispatch, axes):
  config = tiny_config(num_layers=1, num_experts=4, num_experts_per_tok=2, num_shared_experts=1,
                       expert_mlp_dim=32, moe_dispatch=dispatch, capacity_factor=1.0)
  objective = build_objective('causal_lm', build_model(
      ModelConfig.from_dict(config.model.to_dict())), config)
  single = partitioner()
  params, _ = single.init(objective.init_fn, jax.random.key(0))
  batch = packed_batch(8, config.data.seq_len, config.model.vocab_size)
  ref_grads, ref_metrics, _ = _loss_and_grads(single, objective, params, batch)
  if dispatch == 'capacity':
    assert float(ref_metrics['moe_dropped'][0]) > 0    # drops must agree across meshes too
  grads, metrics, placed = _loss_and_grads(partitioner(**axes), objective, params, batch)
  for name, (s, c) in ref_metrics.items():
    np.testing.assert_allclose(metrics[name][0], s, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(metrics[name][1], c, rtol=1e-6, err_msg=name)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(np.abs(r).max()))
  # Each device holds only its experts' slice of the expert kernels.
  wi = placed['layers']['moe']['mlp']['wi_0']     # [layers, expert, embed, mlp]
  assert wi.addressable_shards[0].data.shape == (
      1, 4 // axes['expert'], 64 // axes.get('fsdp', 1), 32 // axes.get('tensor', 1))


def test_aux_free_bias_moves_by_rate_times_sign_of_load_gap_and_leaves_the_loss_alone():
  cfg = dataclasses.replace(CFG, router_bias_update_rate=0.01)
  x, params = _setup(cfg)
  assert set(params) - set(_setup(CFG)[1]) == {'router_bias'}

  def aux(p):
    return _apply(cfg, p, x)[1]['moe_aux_loss'][0]

  no_bias = {k: v for k, v in params.items() if k != 'router_bias'}
  np.testing.assert_allclose(aux(params), _apply(CFG, no_bias, x)[1]['moe_aux_loss'][0],
                             rtol=1e-6)
  load = np.array([float(_apply(cfg, params, x)[1][f'moe_load_e{i:02d}'][0]) for i in range(4)])
  grads = jax.grad(aux)(params)
  tx = with_surrogate_updates(optax.adamw(1e-3))
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['router_bias'], 0.01 * np.sign(0.25 - load), rtol=1e-6)
  assert not np.allclose(updates['router'], -grads['router'])   # AdamW for the rest
  # The bias steers selection: a large one sends every token to expert 0 (one of its 2 picks).
  favour0 = dict(params, router_bias=jnp.array([10.0, 0.0, 0.0, 0.0]))
  assert float(_apply(cfg, favour0, x)[1]['moe_load_e00'][0]) == 0.5
