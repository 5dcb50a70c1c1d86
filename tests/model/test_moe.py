"""MoE block: both dispatches and both grouped matmuls against a dense every-expert reference,
exact drops, padding left unrouted, aux-loss formula, layer patterns, and expert-parallel meshes
(all_to_all dropless, capacity) equal to one device in loss and gradients."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import meta

from model import ModelConfig, build_model
from model.flops import active_layer_params
from model.moe import MOE_COLLECTION, MoE, capacity, load_balance_loss, moe_metrics
from tests.helpers import packed_batch, partitioner
from train.optimizer import with_surrogate_updates

# Blocks of 4 rows: experts span several blocks and most end in padding rows.
CFG = ModelConfig(d_model=16, mlp_dim=24, num_experts=4, num_experts_per_tok=2,
                  num_shared_experts=1, expert_mlp_dim=8, moe_block_size=4)
SHAPE = (2, 12)


def _host_params(module, *args):
  """Parameters of `module`'s shapes drawn on the host, normal / sqrt(fan-in): compiling its
  initializers would cost more than the tests that use them."""
  shapes = meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *args)['params'])
  rng = np.random.RandomState(0)
  return jax.tree.map(lambda s: jnp.asarray(
      rng.standard_normal(s.shape) / np.sqrt(s.shape[-2] if s.ndim > 1 else 1), s.dtype), shapes)


@pytest.fixture(scope='module')
def setup():
  x = jax.random.normal(jax.random.key(1), SHAPE + (CFG.d_model,))
  return x, _host_params(MoE(CFG), x)


@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg, params, x, valid=None):
  out, stats = MoE(cfg).apply({'params': params}, x, valid, mutable=[MOE_COLLECTION])
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
  return jnp.einsum('bled,ble->bld', every, combine) + shared, np.asarray(ids)


@pytest.mark.parametrize('score,renormalize,scaling,matmul', [
    ('softmax', True, 1.0, 'blocked'), ('sigmoid', False, 2.5, 'ragged_dot')])
def test_dropless_equals_dense_every_expert_reference(setup, score, renormalize, scaling, matmul):
  cfg = dataclasses.replace(CFG, router_score=score, renormalize=renormalize,
                            routed_scaling=scaling, moe_grouped_matmul=matmul)
  x, params = setup
  out, metrics = _apply(cfg, params, x)
  expected, _ = _reference(cfg, params, x)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
  assert float(metrics['moe_dropped'][0]) == 0.0
  loads = [float(metrics[f'moe_load_e{i:02d}'][0]) for i in range(cfg.num_experts)]
  assert abs(sum(loads) - 1.0) < 1e-6
  expected_aux = (cfg.load_balance_loss * metrics['moe_load_balance'][0]
                  + cfg.router_z_loss * metrics['moe_router_z'][0])
  np.testing.assert_allclose(metrics['moe_aux_loss'][0], expected_aux, rtol=1e-6)


def test_capacity_with_room_for_all_equals_dropless(setup):
  x, params = setup
  roomy = dataclasses.replace(CFG, moe_dispatch='capacity', capacity_factor=CFG.num_experts)
  out, metrics = _apply(roomy, params, x)
  np.testing.assert_allclose(out, _apply(CFG, params, x)[0], atol=1e-5, rtol=1e-5)
  assert float(metrics['moe_dropped'][0]) == 0.0


def test_small_capacity_drops_exactly_the_overflow_pairs_and_padding_takes_no_slot(setup):
  cfg = dataclasses.replace(CFG, moe_dispatch='capacity', capacity_factor=0.5)
  x, params = setup
  _, ids = _reference(cfg, params, x)
  valid = np.ones(SHAPE, bool)
  valid[0, 2:5] = False              # padding early in a row, where it would have taken slots
  cap = capacity(cfg, x.shape[1])
  assert cap == 3
  # Within a sequence, first choices of all tokens come before second choices, in token order;
  # padding tokens are skipped.
  keep = np.zeros(ids.shape, np.float32)
  for b in range(ids.shape[0]):
    taken = [0] * cfg.num_experts
    for j in range(ids.shape[2]):
      for t in np.flatnonzero(valid[b]):
        keep[b, t, j] = taken[ids[b, t, j]] < cap
        taken[ids[b, t, j]] += 1
  routed = 2 * valid.sum()
  assert 0 < keep.sum() < routed
  out, metrics = _apply(cfg, params, x, jnp.asarray(valid))
  np.testing.assert_allclose(out, _reference(cfg, params, x, keep)[0], atol=1e-5, rtol=1e-5)
  dropped, count = metrics['moe_dropped']
  assert (float(dropped), float(count)) == (routed - keep.sum(), routed)


@pytest.mark.parametrize('dispatch', ['dropless', 'capacity'])
def test_padding_gets_no_routed_output_and_counts_in_no_statistic(setup, dispatch):
  cfg = dataclasses.replace(CFG, moe_dispatch=dispatch, capacity_factor=CFG.num_experts)
  x, params = setup
  valid = np.arange(SHAPE[1]) < np.array([[12], [7]])     # row 1 ends in 5 padding tokens
  out, metrics = _apply(cfg, params, x, jnp.asarray(valid))
  keep = np.broadcast_to(valid[..., None], SHAPE + (2,)).astype(np.float32)
  expected, ids = _reference(cfg, params, x, keep)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)    # padding: shared only
  load = np.bincount(ids[valid].ravel(), minlength=4) / (2 * valid.sum())
  np.testing.assert_allclose([metrics[f'moe_load_e{i:02d}'][0] for i in range(4)], load,
                             rtol=1e-6)
  logits = np.asarray(x @ params['router'])[valid]
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(metrics['moe_load_balance'][0], 4 * np.sum(load * probs.mean(0)),
                             rtol=1e-5)
  z = np.log(np.exp(logits).sum(-1)) ** 2
  np.testing.assert_allclose(metrics['moe_router_z'][0], z.mean(), rtol=1e-5)
  assert tuple(map(float, metrics['moe_dropped'])) == (0.0, 2.0 * valid.sum())


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


def test_decoder_routes_only_its_real_tokens():
  cfg = dataclasses.replace(CFG, vocab_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                            head_dim=8)
  batch = packed_batch(2, 12, cfg.vocab_size)      # each row ends in padding
  model = build_model(cfg)
  args = (batch['inputs'], batch['positions'], batch['segment_ids'])
  _, stats = jax.jit(functools.partial(model.apply, mutable=[MOE_COLLECTION]))(
      {'params': _host_params(model, *args)}, *args)
  real = int(np.sum(batch['segment_ids'] > 0))
  assert real < batch['segment_ids'].size
  assert float(moe_metrics(stats)['moe_dropped'][1]) == cfg.num_experts_per_tok * real


# Sharded = one device for every dispatch. 'blocked' runs with a router bias that sends every
# token to experts 0 and 1: on the expert=2 mesh one device holds both, on expert=4 each takes
# all tokens, the worst cases that the dropless send buffers are sized for.
VARIANTS = {'blocked': dict(router_bias_update_rate=0.01),
            'ragged_dot': dict(moe_grouped_matmul='ragged_dot'),
            'capacity': dict(moe_dispatch='capacity', capacity_factor=1.0)}
SHARD_SHAPE = (8, 6)        # 6 tokens per device on 8 devices


def _loss_and_grads(cfg, params, x, valid):
  def loss(p, x):
    out, stats = MoE(cfg).apply({'params': p}, x, valid, mutable=[MOE_COLLECTION])
    metrics = moe_metrics(stats)
    return jnp.sum(out * jnp.cos(x)) + metrics['moe_aux_loss'][0], metrics
  return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)


@pytest.fixture(scope='module')
def one_device(setup):
  """Per variant: (cfg, params, x, valid, one-device grads and metrics) off any mesh."""
  x = jax.random.normal(jax.random.key(2), SHARD_SHAPE + (CFG.d_model,))
  valid = jnp.asarray(np.arange(SHARD_SHAPE[1]) < np.arange(8, 0, -1)[:, None] % 7 + 1)
  out = {}
  for name, overrides in VARIANTS.items():
    cfg = dataclasses.replace(CFG, moe_block_size=2, **overrides)
    params = dict(setup[1])
    if cfg.router_bias_update_rate:
      params['router_bias'] = jnp.array([10.0, 10.0, 0.0, 0.0])
    out[name] = (cfg, params, x, valid,
                 jax.jit(functools.partial(_loss_and_grads, cfg))(params, x, valid))
  return out


@pytest.mark.parametrize('axes', [dict(expert=4, data=2), dict(expert=2, fsdp=2, tensor=2)],
                         ids=str)
def test_expert_parallel_mesh_equals_one_device(one_device, axes):
  part = partitioner(**axes)
  tokens = part.sharding(('batch', 'length', 'embed'))
  for name, (cfg, params, x, valid, (ref_grads, ref_metrics)) in one_device.items():
    if name == 'blocked':
      assert float(ref_metrics['moe_load_e00'][0]) == float(ref_metrics['moe_load_e01'][0]) == 0.5
    if name == 'capacity':
      assert float(ref_metrics['moe_dropped'][0]) > 0    # drops must agree across meshes too
    _, shardings = part.abstract(lambda r: MoE(cfg).init(r, x, valid)['params'],
                                 jax.random.key(0))
    args = (jax.device_put(params, shardings), jax.device_put(x, tokens),
            jax.device_put(valid, part.sharding(('batch', 'length'))))
    compiled = part.jit(functools.partial(_loss_and_grads, cfg),
                        out_shardings=((shardings, tokens), part.replicated)).lower(*args).compile()
    if cfg.moe_dispatch == 'dropless':
      assert 'all-to-all' in compiled.as_text(), name
    grads, metrics = compiled(*args)
    for key, (s, c) in ref_metrics.items():
      np.testing.assert_allclose(metrics[key][0], s, rtol=1e-5, atol=1e-6, err_msg=name + key)
      np.testing.assert_allclose(metrics[key][1], c, rtol=1e-6, err_msg=name + key)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(np.abs(r).max()),
                                 err_msg=name)
    # Each device holds only its experts' slice of the expert kernels.
    assert args[0]['wi_0'].addressable_shards[0].data.shape == (
        4 // axes['expert'], 16 // axes.get('fsdp', 1), 8 // axes.get('tensor', 1))


def test_bounded_exchange_drops_exactly_each_chunks_overflow(one_device):
  cfg = dataclasses.replace(CFG, moe_block_size=2, moe_exchange_factor=0.5)
  _, params, x, valid, _ = one_device['ragged_dot']
  _, ids = _reference(cfg, params, x)
  # One batch row and one expert per device: each device sends each expert at most
  # ceil(0.5 * 12 pairs / 4 devices) = 2 pairs, in token order; the rest are dropped.
  keep = np.zeros(ids.shape, np.float32)
  for b in range(SHARD_SHAPE[0]):
    sent = [0] * cfg.num_experts
    for t in np.flatnonzero(valid[b]):
      for j in range(ids.shape[2]):
        keep[b, t, j] = sent[ids[b, t, j]] < 2
        sent[ids[b, t, j]] += 1
  routed = 2 * int(valid.sum())
  assert 0 < keep.sum() < routed
  out, metrics = partitioner(expert=4, data=2).jit(
      lambda p, x, v: _apply(cfg, p, x, v))(params, x, valid)
  np.testing.assert_allclose(out, _reference(cfg, params, x, keep)[0], atol=1e-5, rtol=1e-5)
  assert tuple(map(float, metrics['moe_dropped'])) == (routed - keep.sum(), routed)


def test_aux_free_bias_moves_by_rate_times_sign_of_load_gap_and_leaves_the_loss_alone(setup):
  cfg = dataclasses.replace(CFG, router_bias_update_rate=0.01)
  x, no_bias = setup
  params = dict(no_bias, router_bias=jnp.zeros((4,)))
  assert set(jax.eval_shape(MoE(cfg).init, jax.random.key(0), x)['params']) == set(params)

  def aux(p):
    return _apply(cfg, p, x)[1]['moe_aux_loss'][0]

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
