"""Mixture-of-experts feed-forward block: router, top-k, routed + shared experts, two dispatches.

Dispatch paths (model.moe_dispatch):
- 'dropless': token-expert pairs are sorted by expert and run as one grouped matmul
  (jax.lax.ragged_dot); nothing is dropped.
- 'capacity': every sequence is a routing group; each expert takes at most
  ceil(capacity_factor * length * k / num_experts) of a group's pairs (first choices of all
  tokens before second choices, earlier tokens first); the rest are dropped and counted.
  The [group, expert, capacity, embed] buffer is resharded expert-major, so on a mesh with an
  'expert' axis tokens travel to their experts' devices (an all-to-all chosen by XLA).

Every MoE layer sows its statistics into the MOE_COLLECTION variable collection;
`moe_metrics` turns them into (sum, count) metrics and `aux_loss` gives the optimized term.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.layers import ACTIVATIONS, MLP

MOE_COLLECTION = 'moe_stats'
SCORE_FNS = ('softmax', 'sigmoid')
DISPATCHES = ('dropless', 'capacity')


def _expert_init(axes):
  """Fan-in init for [expert, in, out] kernels: each expert is initialised like a dense layer."""
  init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal', in_axis=-2,
                                          out_axis=-1, batch_axis=(0,))
  return nn.with_logical_partitioning(init, axes)


def _router_init():
  return nn.with_logical_partitioning(
      nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal'), ('embed', None))


def capacity(cfg: ModelConfig, group_size: int) -> int:
  """Token-expert pairs one expert accepts from a group of `group_size` tokens."""
  return max(1, math.ceil(cfg.capacity_factor * group_size * cfg.num_experts_per_tok
                          / cfg.num_experts))


def route(cfg: ModelConfig, logits: jax.Array, bias=None):
  """Router logits [..., E] -> (expert ids [..., k], combine weights [..., k], scores [..., E]).

  `bias` (aux-loss-free balancing) shifts which experts are selected, not their weights.
  """
  logits = logits.astype(jnp.float32)
  scores = jax.nn.softmax(logits) if cfg.router_score == 'softmax' else jax.nn.sigmoid(logits)
  select = scores if bias is None else scores + bias
  _, ids = jax.lax.top_k(select, cfg.num_experts_per_tok)
  weights = jnp.take_along_axis(scores, ids, axis=-1)
  if cfg.renormalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return ids, weights * cfg.routed_scaling, scores


def load_balance_loss(scores: jax.Array, ids: jax.Array, num_experts: int) -> jax.Array:
  """Switch-Transformer balance loss E * sum_i f_i * P_i over all tokens: f_i is the fraction of
  token-expert pairs sent to expert i, P_i the mean router probability of expert i (scores
  normalised per token, so sigmoid routers fit too). Equals 1 under perfectly uniform routing."""
  probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
  f = expert_load(ids, num_experts)
  p = jnp.mean(probs.reshape(-1, num_experts), axis=0)
  return num_experts * jnp.sum(f * p)


def expert_load(ids: jax.Array, num_experts: int) -> jax.Array:
  """Fraction of token-expert pairs routed to each expert, [E] summing to 1."""
  counts = jnp.zeros((num_experts,), jnp.float32).at[ids.reshape(-1)].add(1.0)
  return counts / ids.size


def bias_update_surrogate(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
  """Zero-valued term whose gradient w.r.t. `bias` is rate * sign(load - mean load).

  The optimizer applies it as p <- p - g (train/optimizer.SURROGATE_UPDATE_NAMES), which is
  DeepSeek-V3's aux-loss-free update b_i += rate * sign(mean load - load_i).
  """
  step = jax.lax.stop_gradient(rate * jnp.sign(load - jnp.mean(load)))
  term = jnp.sum(step * bias)
  return term - jax.lax.stop_gradient(term)


def router_z_loss(logits: jax.Array) -> jax.Array:
  """Mean squared log-partition of the router logits (ST-MoE)."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def _slots(ids: jax.Array, num_experts: int, cap: int):
  """One group's pairs ids [T, k] -> (buffer slot [k*T] (choice-major), kept [k*T]).

  Slot e * cap + position-in-expert; dropped pairs point at the spare row num_experts * cap.
  """
  flat = ids.T.reshape(-1)                              # first choices of all tokens first
  one_hot = jax.nn.one_hot(flat, num_experts, dtype=jnp.int32)
  position = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)
  kept = position < cap
  return jnp.where(kept, flat * cap + position, num_experts * cap), kept


class MoE(nn.Module):
  """x [B, L, D] -> [B, L, D]: shared experts (always on) + top-k routed experts."""
  cfg: ModelConfig

  def _check(self):
    cfg = self.cfg
    if cfg.router_score not in SCORE_FNS:
      raise ValueError(f'model.router_score={cfg.router_score!r}; choose one of {SCORE_FNS}.')
    if cfg.moe_dispatch not in DISPATCHES:
      raise ValueError(f'model.moe_dispatch={cfg.moe_dispatch!r}; choose one of {DISPATCHES}.')
    if not 0 < cfg.num_experts_per_tok <= cfg.num_experts:
      raise ValueError(f'model.num_experts_per_tok={cfg.num_experts_per_tok} must be in '
                       f'[1, model.num_experts={cfg.num_experts}].')

  def _experts(self, x, matmul):
    """The routed experts' FFN with `matmul(x, kernel [E, in, out])` doing the grouping."""
    cfg = self.cfg
    act, gated = ACTIVATIONS[cfg.activation]
    dim = cfg.expert_mlp_dim or cfg.mlp_dim
    dtype = cfg.compute_dtype

    def kernel(name, shape, axes):
      return self.param(name, _expert_init(axes), shape, cfg.weight_dtype).astype(dtype)

    up_shape, up_axes = (cfg.num_experts, cfg.d_model, dim), ('expert', 'embed', 'mlp')
    x = x.astype(dtype)
    if gated:
      h = act(matmul(x, kernel('wi_0', up_shape, up_axes))) * matmul(
          x, kernel('wi_1', up_shape, up_axes))
    else:
      h = act(matmul(x, kernel('wi', up_shape, up_axes)))
    return matmul(h, kernel('wo', (cfg.num_experts, dim, cfg.d_model), ('expert', 'mlp', 'embed')))

  def _dropless(self, x, ids, weights):
    """Sort pairs by expert, one ragged matmul per kernel, unsort and combine."""
    cfg = self.cfg
    b, l, d = x.shape
    k = cfg.num_experts_per_tok
    tokens = x.reshape(b * l, d)
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.zeros((cfg.num_experts,), jnp.int32).at[flat].add(1)
    ys = self._experts(tokens[order // k],
                       lambda h, w: jax.lax.ragged_dot(h, w, sizes))
    ys = jnp.zeros_like(ys).at[order].set(ys).reshape(b * l, k, d)
    out = jnp.einsum('tkd,tk->td', ys, weights.reshape(b * l, k).astype(ys.dtype))
    return out.reshape(b, l, d), jnp.zeros((), jnp.float32)

  def _capacity(self, x, ids, weights):
    """Scatter each group's pairs into [E, C] slots, run experts expert-major, gather back."""
    cfg = self.cfg
    b, l, d = x.shape
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    cap = capacity(cfg, l)
    slots, kept = jax.vmap(lambda i: _slots(i, e, cap))(ids)          # [B, k*L]
    token = jnp.tile(jnp.arange(l), k)

    def dispatch(xg, slot):
      return jnp.zeros((e * cap + 1, d), xg.dtype).at[slot].set(xg[token])[:-1]

    buf = jax.vmap(dispatch)(x, slots).reshape(b, e, cap, d)
    buf = nn.with_logical_constraint(buf, ('batch', None, None, 'embed'))
    buf = nn.with_logical_constraint(buf.swapaxes(0, 1), ('expert', 'batch', None, 'embed'))
    ys = self._experts(buf, lambda h, w: jnp.einsum('ebci,eio->ebco', h, w))
    ys = nn.with_logical_constraint(ys, ('expert', 'batch', None, 'embed'))
    ys = nn.with_logical_constraint(ys.swapaxes(0, 1), ('batch', None, None, 'embed'))
    ys = ys.reshape(b, e * cap, d)
    ys = jnp.concatenate([ys, jnp.zeros((b, 1, d), ys.dtype)], axis=1)  # the dropped row
    pairs = jnp.take_along_axis(ys, slots[..., None], axis=1).reshape(b, k, l, d)
    w = (weights.transpose(0, 2, 1) * kept.reshape(b, k, l)).astype(ys.dtype)
    out = jnp.einsum('bkld,bkl->bld', pairs, w)
    return out, jnp.sum(~kept).astype(jnp.float32)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    self._check()
    router = self.param('router', _router_init(), (cfg.d_model, cfg.num_experts),
                        cfg.weight_dtype)
    logits = jnp.einsum('bld,de->ble', x.astype(jnp.float32), router.astype(jnp.float32))
    bias = None
    if cfg.router_bias_update_rate:
      bias = self.param('router_bias', nn.with_logical_partitioning(
          nn.initializers.zeros, ('expert',)), (cfg.num_experts,), jnp.float32)
    ids, weights, scores = route(cfg, logits, bias)
    dispatch = self._dropless if cfg.moe_dispatch == 'dropless' else self._capacity
    out, dropped = dispatch(x, ids, weights)
    out = nn.with_logical_constraint(out.astype(cfg.compute_dtype), ('batch', 'length', 'embed'))
    if cfg.num_shared_experts:
      shared_dim = cfg.num_shared_experts * (cfg.expert_mlp_dim or cfg.mlp_dim)
      out = out + MLP(dataclasses.replace(cfg, mlp_dim=shared_dim), name='shared')(x)
    balance = load_balance_loss(scores, ids, cfg.num_experts)
    z = router_z_loss(logits)
    load = expert_load(ids, cfg.num_experts)
    aux = cfg.load_balance_loss * balance + cfg.router_z_loss * z
    if bias is not None:
      aux = aux + bias_update_surrogate(bias, load, cfg.router_bias_update_rate)
    for name, value in (('aux_loss', aux), ('load_balance', balance), ('router_z', z),
                        ('load', load), ('dropped', dropped),
                        ('routed', jnp.asarray(ids.size, jnp.float32))):
      self.sow(MOE_COLLECTION, name, value)
    return out


def moe_metrics(stats) -> dict:
  """The sown MOE_COLLECTION of one forward pass -> {name: (sum, count)} scalars.

  moe_aux_loss: the weighted balance + z terms summed over MoE layers (added to the loss);
  moe_load_balance, moe_router_z: per-layer means; moe_load_eNN: fraction of token-expert pairs
  sent to expert NN (1 / num_experts when balanced), mean over layers; moe_dropped: fraction of
  pairs dropped by the capacity dispatch. Empty for a dense model.
  """
  by_name = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(stats):
    names = [getattr(p, 'key', None) for p in path]
    name = next(n for n in reversed(names) if n in _STAT_NAMES)
    by_name.setdefault(name, []).append(leaf)
  if not by_name:
    return {}
  cat = {n: jnp.concatenate([jnp.reshape(v, (-1,) + ((v.shape[-1],) if n == 'load' else ()))
                             for v in vs]) for n, vs in by_name.items()}
  layers = jnp.asarray(cat['aux_loss'].shape[0], jnp.float32)
  out = {'moe_aux_loss': (jnp.sum(cat['aux_loss']), jnp.ones((), jnp.float32)),
         'moe_load_balance': (jnp.sum(cat['load_balance']), layers),
         'moe_router_z': (jnp.sum(cat['router_z']), layers),
         'moe_dropped': (jnp.sum(cat['dropped']), jnp.sum(cat['routed']))}
  load = jnp.sum(cat['load'], axis=0)
  for i in range(load.shape[0]):
    out[f'moe_load_e{i:02d}'] = (load[i], layers)
  return out


_STAT_NAMES = ('aux_loss', 'load_balance', 'router_z', 'load', 'dropped', 'routed')
