"""Mixture-of-experts feed-forward block: router, top-k, routed + shared experts, two dispatches.

Dispatch paths (model.moe_dispatch):
- 'dropless': each device sorts its token-expert pairs by expert into a buffer in which every
  expert's rows are padded to a multiple of model.moe_block_size, one chunk per device of the
  'expert' mesh axis; an all_to_all sends each chunk to the device holding its experts, the
  experts run as a grouped matmul (model.moe_grouped_matmul), and an all_to_all brings the
  results back. A chunk holds its destination's worst case (every pair of the sending device),
  so nothing is ever dropped, and only filled blocks are computed; with an expert mesh axis
  that is mesh-size times the mean, so model.moe_exchange_factor > 0 may bound a chunk to that
  many times its mean pairs instead: a chunk's overflow (its last experts' last tokens) is then
  dropped and counted like the capacity dispatch's. The grouped matmul is
  'blocked' (a loop over the filled blocks, one matmul each with its expert's kernel: XLA:CPU
  lowers ragged_dot to a dense matmul of every expert with every row) or 'ragged_dot' (native
  on GPU/TPU; block size 1).
- 'capacity': every sequence is a routing group; each expert takes at most
  ceil(capacity_factor * length * k / num_experts) of a group's pairs (first choices of all
  tokens before second choices, earlier tokens first); the rest are dropped and counted.
  The [group, expert, capacity, embed] buffer is resharded expert-major, so on a mesh with an
  'expert' axis tokens travel to their experts' devices (an all-to-all chosen by XLA).

Padding tokens (`valid` False: segment id 0) are not routed: they take no expert capacity,
get no routed output, and are left out of the load, balance and z-loss statistics.

Every MoE layer sows its statistics into the MOE_COLLECTION variable collection;
`moe_metrics` turns them into (sum, count) metrics and `aux_loss` gives the optimized term.
"""

import dataclasses
import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from model.config import ModelConfig
from model.layers import ACTIVATIONS, MLP

MOE_COLLECTION = 'moe_stats'
SCORE_FNS = ('softmax', 'sigmoid')
DISPATCHES = ('dropless', 'capacity')
GROUPED_MATMULS = ('auto', 'ragged_dot', 'blocked')


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


def grouped_matmul_impl(cfg: ModelConfig) -> str:
  """model.moe_grouped_matmul with 'auto' resolved: ragged_dot where XLA has a native kernel
  (GPU, TPU), else 'blocked'."""
  if cfg.moe_grouped_matmul != 'auto':
    return cfg.moe_grouped_matmul
  return 'ragged_dot' if jax.default_backend() in ('gpu', 'tpu') else 'blocked'


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


def _token_mean(values: jax.Array, valid: Optional[jax.Array]) -> jax.Array:
  """Mean of values [..., X] over the tokens (all leading dims) that are `valid` [...]."""
  flat = values.reshape(-1, values.shape[-1])
  if valid is None:
    return jnp.mean(flat, axis=0)
  w = valid.reshape(-1, 1).astype(flat.dtype)
  return jnp.sum(flat * w, axis=0) / jnp.maximum(jnp.sum(w), 1.0)


def load_balance_loss(scores: jax.Array, ids: jax.Array, num_experts: int,
                      valid: Optional[jax.Array] = None) -> jax.Array:
  """Switch-Transformer balance loss E * sum_i f_i * P_i over the valid tokens: f_i is the
  fraction of token-expert pairs sent to expert i, P_i the mean router probability of expert i
  (scores normalised per token, so sigmoid routers fit too). Equals 1 under perfectly uniform
  routing."""
  probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
  return num_experts * jnp.sum(expert_load(ids, num_experts, valid) * _token_mean(probs, valid))


def expert_load(ids: jax.Array, num_experts: int, valid: Optional[jax.Array] = None) -> jax.Array:
  """Fraction of the valid tokens' token-expert pairs routed to each expert, [E] summing to 1
  (all zeros when no token is valid)."""
  live = jnp.ones(ids.shape, jnp.float32) if valid is None else jnp.broadcast_to(
      valid[..., None], ids.shape).astype(jnp.float32)
  counts = jnp.zeros((num_experts,), jnp.float32).at[ids.reshape(-1)].add(live.reshape(-1))
  return counts / jnp.maximum(jnp.sum(live), 1.0)


def bias_update_surrogate(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
  """Zero-valued term whose gradient w.r.t. `bias` is rate * sign(load - mean load).

  The optimizer applies it as p <- p - g (train/optimizer.SURROGATE_UPDATE_NAMES), which is
  DeepSeek-V3's aux-loss-free update b_i += rate * sign(mean load - load_i).
  """
  step = jax.lax.stop_gradient(rate * jnp.sign(load - jnp.mean(load)))
  term = jnp.sum(step * bias)
  return term - jax.lax.stop_gradient(term)


def router_z_loss(logits: jax.Array, valid: Optional[jax.Array] = None) -> jax.Array:
  """Mean over valid tokens of the squared log-partition of the router logits (ST-MoE)."""
  z = jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1))
  return _token_mean(z[..., None], valid)[0]


def _slots(ids: jax.Array, valid: jax.Array, num_experts: int, cap: int):
  """One group's pairs ids [T, k] -> (buffer slot [k*T] (choice-major), kept [k*T]).

  Slot e * cap + position-in-expert; dropped and padding pairs point at the spare row
  num_experts * cap. Padding tokens (`valid` [T] False) take no position.
  """
  flat = ids.T.reshape(-1)                              # first choices of all tokens first
  live = jnp.tile(valid, ids.shape[1])
  one_hot = jax.nn.one_hot(flat, num_experts, dtype=jnp.int32) * live[:, None]
  position = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)
  kept = live & (position < cap)
  return jnp.where(kept, flat * cap + position, num_experts * cap), kept


def _expert_ffn(cfg: ModelConfig, kernels: tuple, x: jax.Array, matmul) -> jax.Array:
  """The routed experts' FFN on x with `matmul(x, kernel [E, in, out])` doing the grouping."""
  act, gated = ACTIVATIONS[cfg.activation]
  if gated:
    wi_0, wi_1, wo = kernels
    return matmul(act(matmul(x, wi_0)) * matmul(x, wi_1), wo)
  wi, wo = kernels
  return matmul(act(matmul(x, wi)), wo)


@jax.custom_vjp
def _block_matmul(x, w, block_expert, order, count):
  """x [blocks, B, in] -> [blocks, B, out]: for i < count, block j = order[i] times
  w[block_expert[j]] ([E, in, out]); every other block is zero and costs nothing."""
  return _block_matmul_fwd(x, w, block_expert, order, count)[0]


def _block_matmul_fwd(x, w, block_expert, order, count):
  def body(i, y):
    j = order[i]
    return jax.lax.dynamic_update_index_in_dim(y, x[j] @ w[block_expert[j]], j, 0)
  zeros = jnp.zeros_like(x, shape=x.shape[:2] + w.shape[2:])
  return jax.lax.fori_loop(0, count, body, zeros), (x, w, block_expert, order, count)


def _block_matmul_bwd(residuals, dy):
  x, w, block_expert, order, count = residuals

  def body(i, carry):
    dx, dw = carry
    j = order[i]
    e = block_expert[j]
    dx = jax.lax.dynamic_update_index_in_dim(dx, dy[j] @ w[e].T, j, 0)
    grad = jnp.matmul(x[j].T, dy[j], preferred_element_type=jnp.float32)
    return dx, jax.lax.dynamic_update_index_in_dim(dw, dw[e] + grad, e, 0)

  dx, dw = jax.lax.fori_loop(0, count, body, (jnp.zeros_like(x), jnp.zeros_like(w, jnp.float32)))
  return dx, dw.astype(w.dtype), None, None, None


_block_matmul.defvjp(_block_matmul_fwd, _block_matmul_bwd)


def _grouped_ffn(cfg: ModelConfig, impl: str, kernels: tuple, x: jax.Array,
                 block_expert: jax.Array) -> jax.Array:
  """Expert FFN of x [blocks, B, D], block j belonging to local expert block_expert[j]
  (>= the kernels' expert count: an empty block, left out)."""
  local = kernels[0].shape[0]
  live = block_expert < local
  if impl == 'blocked':
    order = jnp.argsort(~live, stable=True)             # filled blocks first
    count = jnp.sum(live)
    return _expert_ffn(cfg, kernels, x,
                       lambda h, w: _block_matmul(h, w, block_expert, order, count))
  rows = x.reshape(-1, x.shape[-1])                     # ragged_dot: blocks of one row
  order = jnp.argsort(block_expert, stable=True)        # empty rows last, past every group
  sizes = jnp.zeros((local + 1,), jnp.int32).at[block_expert].add(1)[:local]
  y = _expert_ffn(cfg, kernels, rows[order], lambda h, w: jax.lax.ragged_dot(h, w, sizes))
  return jnp.zeros_like(y).at[order].set(y).reshape(x.shape[:2] + y.shape[-1:])


def _dispatch_plan(ids: jax.Array, valid: jax.Array, num_experts: int, groups: int, block: int,
                   factor: float = 0.0):
  """Where one device's token-expert pairs go in its send buffer of `groups` chunks.

  Chunk d holds the pairs of experts d*E/groups ... (d+1)*E/groups - 1 (the experts of the d-th
  device along the expert mesh axes) sorted by expert, then token, each expert's rows padded to
  a multiple of `block`. A chunk has room for the worst case, every pair of ids [T, k] that can
  go to it, or with `factor` > 0 (and groups > 1) for `factor` times its mean pairs (plus
  padding): pairs past its end are dropped. Pairs of tokens not `valid` [T] are not sent.

  Returns (slot_pair [groups * rows]: the pair (t * k + j) in each buffer row, T * k if none;
  pair_slot [T * k]: each pair's buffer row, groups * rows if unsent; block_expert
  [groups, rows / block]: each block's expert within its chunk, E / groups if empty;
  the number of valid pairs dropped).
  """
  t, k = ids.shape
  n, local = t * k, num_experts // groups
  key = jnp.where(valid[:, None], ids, num_experts).reshape(-1)
  order = jnp.argsort(key, stable=True)
  counts = jnp.zeros((num_experts + 1,), jnp.int32).at[key].add(1)[:num_experts]
  first = jnp.cumsum(counts) - counts                   # sorted position of an expert's first pair
  padded = (counts + block - 1) // block * block
  ends = jnp.cumsum(padded.reshape(groups, local), axis=1)
  starts = ends.reshape(-1) - padded                    # chunk row of an expert's first pair
  # A token's k experts are distinct, so at most t * min(k, local) pairs share a chunk; padding
  # adds under `block` rows per expert, and the blocks hold the sum rounded down.
  room = t * min(k, local)
  if factor and groups > 1:
    room = min(room, math.ceil(factor * n / groups))
  rows = (room + local * (block - 1)) // block * block
  r = jnp.arange(rows)
  within = jax.vmap(lambda e: jnp.searchsorted(e, r, side='right'))(ends)   # [groups, rows]
  expert = jnp.minimum(within, local - 1) + local * jnp.arange(groups)[:, None]
  rank = r - starts[expert]
  filled = (within < local) & (rank < counts[expert])
  slot_pair = jnp.where(filled, order[jnp.minimum(first[expert] + rank, n - 1)], n)
  sorted_key = key[order]
  e = jnp.minimum(sorted_key, num_experts - 1)
  row = starts[e] + jnp.arange(n) - first[e]
  sent = (sorted_key < num_experts) & (row < rows)
  slot = jnp.where(sent, (e // local) * rows + row, groups * rows)
  pair_slot = jnp.zeros((n,), jnp.int32).at[order].set(slot, unique_indices=True)
  dropped = jnp.sum(sorted_key < num_experts) - jnp.sum(sent)
  return slot_pair.reshape(-1), pair_slot, within[:, ::block], dropped


def _dropless_shard(cfg: ModelConfig, impl: str, token_axes: tuple, expert_axes: tuple,
                    mlp_axes: tuple, x, ids, weights, valid, kernels):
  """Dropless dispatch of the tokens x [B, L, D] one device holds (or of all, off a mesh):
  the tokens differ along `token_axes`, which include the `expert_axes`. Returns the routed
  output and the pairs dropped by a bounded exchange (model.moe_exchange_factor) on all devices.

  `kernels` hold this device's experts (a slice along `expert_axes`) and, with `mlp_axes`, a
  slice of their hidden width whose partial outputs are summed over those axes.
  """
  b, l, d = x.shape
  k = ids.shape[-1]
  groups = cfg.num_experts // kernels[0].shape[0]
  block = cfg.moe_block_size if impl == 'blocked' else 1
  slot_pair, pair_slot, block_expert, dropped = _dispatch_plan(
      ids.reshape(b * l, k), valid.reshape(-1), cfg.num_experts, groups, block,
      cfg.moe_exchange_factor)
  send = jnp.take(x.reshape(b * l, d), slot_pair // k, axis=0, mode='fill', fill_value=0)

  def exchange(a):   # chunk i to the i-th device along the expert axes, theirs back in its place
    return jax.lax.all_to_all(a, expert_axes, 0, 0, tiled=True) if groups > 1 else a

  # The custom-VJP block matmul takes operands that vary over the same mesh axes: tokens over
  # the axes splitting the kernels' width, kernels over those splitting tokens (whose gradients
  # JAX then sums over them, as data parallelism needs).
  spread = lambda a, axes: jax.lax.pcast(a, axes, to='varying') if axes else a
  kernels = tuple(spread(w, tuple(a for a in token_axes if a not in expert_axes))
                  for w in kernels)
  y = _grouped_ffn(cfg, impl, kernels, spread(exchange(send), mlp_axes).reshape(-1, block, d),
                   exchange(block_expert).reshape(-1))
  y = exchange(y.reshape(-1, d))
  pairs = jnp.take(y, pair_slot, axis=0, mode='fill', fill_value=0).reshape(b * l, k, d)
  out = jnp.einsum('tkd,tk->td', pairs, weights.reshape(b * l, k).astype(pairs.dtype))
  if mlp_axes:
    out = jax.lax.psum(out, mlp_axes)
  if token_axes:
    dropped = jax.lax.psum(dropped, token_axes)
  return out.reshape(b, l, d), dropped.astype(jnp.float32)


def _axes(spec_entry) -> tuple:
  return () if spec_entry is None else (spec_entry,) if isinstance(spec_entry, str) else tuple(
      spec_entry)


def _mesh_layout(shape: tuple[int, ...]):
  """How dropless runs per device on the active mesh and logical-axis rules, or None (no mesh,
  or tokens [B, L] that do not split evenly): the mesh axes (batch, length, expert, mlp).

  Mesh axes come from the rules in scope (train/sharding.py), never named here. Devices along
  the expert axes must hold distinct tokens for the all_to_all, so the batch dim is split over
  them too; the experts' hidden width is split over the 'mlp' axes unless those split tokens.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  batch, length = map(_axes, nn.logical_to_mesh_axes(('batch', 'length')))
  expert, _, mlp = map(_axes, nn.logical_to_mesh_axes(('expert', 'embed', 'mlp')))
  batch += tuple(a for a in expert if a not in batch + length)
  if set(mlp) & set(batch + length):
    mlp = ()
  size = lambda axes: math.prod(mesh.shape[a] for a in axes)
  if shape[0] % size(batch) or shape[1] % size(length):
    return None
  return batch, length, expert, mlp


def dropless(cfg: ModelConfig, x, ids, weights, valid, kernels) -> tuple[jax.Array, jax.Array]:
  """(Routed experts' output [B, L, D] of x [B, L, D] with ids/weights [B, L, k], pairs
  dropped: 0 unless model.moe_exchange_factor bounds the exchange); per device (shard_map)
  with all_to_all over the expert axes on a mesh."""
  impl = grouped_matmul_impl(cfg)
  layout = _mesh_layout(x.shape)
  if layout is None:
    return _dropless_shard(cfg, impl, (), (), (), x, ids, weights, valid, kernels)
  batch, length, expert, mlp = layout
  tokens = P(batch or None, length or None)
  up, down = P(expert or None, None, mlp or None), P(expert or None, mlp or None, None)
  pairs = P(*tokens, None)
  fn = jax.shard_map(functools.partial(_dropless_shard, cfg, impl, batch + length, expert, mlp),
                     in_specs=(pairs, pairs, pairs, tokens, (up,) * (len(kernels) - 1) + (down,)),
                     out_specs=(pairs, P()))
  return fn(x, ids, weights, valid, kernels)


class MoE(nn.Module):
  """x [B, L, D] -> [B, L, D]: shared experts (always on) + top-k routed experts. `valid`
  [B, L] (default all) marks real tokens; padding is not routed."""
  cfg: ModelConfig

  def _check(self):
    cfg = self.cfg
    for key, value, choices in (('router_score', cfg.router_score, SCORE_FNS),
                                ('moe_dispatch', cfg.moe_dispatch, DISPATCHES),
                                ('moe_grouped_matmul', cfg.moe_grouped_matmul, GROUPED_MATMULS)):
      if value not in choices:
        raise ValueError(f'model.{key}={value!r}; choose one of {choices}.')
    if not 0 < cfg.num_experts_per_tok <= cfg.num_experts:
      raise ValueError(f'model.num_experts_per_tok={cfg.num_experts_per_tok} must be in '
                       f'[1, model.num_experts={cfg.num_experts}].')
    if cfg.moe_block_size < 1:
      raise ValueError(f'model.moe_block_size={cfg.moe_block_size} must be positive.')
    if cfg.moe_exchange_factor < 0:
      raise ValueError(f'model.moe_exchange_factor={cfg.moe_exchange_factor} must be >= 0 '
                       '(0 = room for the worst case).')

  def _kernels(self) -> tuple:
    """The routed experts' kernels [E, in, out] in the compute dtype: (wi_0, wi_1, wo) if the
    activation is gated, else (wi, wo)."""
    cfg = self.cfg
    dim = cfg.expert_mlp_dim or cfg.mlp_dim
    up = ((cfg.num_experts, cfg.d_model, dim), ('expert', 'embed', 'mlp'))
    down = ((cfg.num_experts, dim, cfg.d_model), ('expert', 'mlp', 'embed'))
    names = ('wi_0', 'wi_1') if ACTIVATIONS[cfg.activation][1] else ('wi',)
    return tuple(self.param(name, _expert_init(axes), shape, cfg.weight_dtype).astype(
        cfg.compute_dtype) for name, (shape, axes) in [(n, up) for n in names] + [('wo', down)])

  def _capacity(self, x, ids, weights, valid, kernels):
    """Scatter each group's pairs into [E, C] slots, run experts expert-major, gather back."""
    cfg = self.cfg
    b, l, d = x.shape
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    cap = capacity(cfg, l)
    slots, kept = jax.vmap(lambda i, v: _slots(i, v, e, cap))(ids, valid)   # [B, k*L]
    token = jnp.tile(jnp.arange(l), k)

    def dispatch(xg, slot):
      return jnp.zeros((e * cap + 1, d), xg.dtype).at[slot].set(xg[token])[:-1]

    buf = jax.vmap(dispatch)(x, slots).reshape(b, e, cap, d)
    buf = nn.with_logical_constraint(buf, ('batch', None, None, 'embed'))
    buf = nn.with_logical_constraint(buf.swapaxes(0, 1), ('expert', 'batch', None, 'embed'))
    ys = _expert_ffn(cfg, kernels, buf, lambda h, w: jnp.einsum('ebci,eio->ebco', h, w))
    ys = nn.with_logical_constraint(ys, ('expert', 'batch', None, 'embed'))
    ys = nn.with_logical_constraint(ys.swapaxes(0, 1), ('batch', None, None, 'embed'))
    ys = ys.reshape(b, e * cap, d)
    ys = jnp.concatenate([ys, jnp.zeros((b, 1, d), ys.dtype)], axis=1)  # the dropped row
    pairs = jnp.take_along_axis(ys, slots[..., None], axis=1).reshape(b, k, l, d)
    w = (weights.transpose(0, 2, 1) * kept.reshape(b, k, l)).astype(ys.dtype)
    out = jnp.einsum('bkld,bkl->bld', pairs, w)
    return out, (k * jnp.sum(valid) - jnp.sum(kept)).astype(jnp.float32)

  @nn.compact
  def __call__(self, x: jax.Array, valid: Optional[jax.Array] = None,
               deterministic: bool = True) -> jax.Array:
    cfg = self.cfg
    self._check()
    valid = jnp.ones(x.shape[:2], bool) if valid is None else valid
    router = self.param('router', _router_init(), (cfg.d_model, cfg.num_experts),
                        cfg.weight_dtype)
    logits = jnp.einsum('bld,de->ble', x.astype(jnp.float32), router.astype(jnp.float32))
    bias = None
    if cfg.router_bias_update_rate:
      bias = self.param('router_bias', nn.with_logical_partitioning(
          nn.initializers.zeros, ('expert',)), (cfg.num_experts,), jnp.float32)
    ids, weights, scores = route(cfg, logits, bias)
    kernels = self._kernels()
    xc = x.astype(cfg.compute_dtype)
    if cfg.moe_dispatch == 'dropless':
      out, dropped = dropless(cfg, xc, ids, weights, valid, kernels)
    else:
      out, dropped = self._capacity(xc, ids, weights, valid, kernels)
    out = nn.with_logical_constraint(out.astype(cfg.compute_dtype), ('batch', 'length', 'embed'))
    if cfg.num_shared_experts:
      shared_dim = cfg.num_shared_experts * (cfg.expert_mlp_dim or cfg.mlp_dim)
      out = out + MLP(dataclasses.replace(cfg, mlp_dim=shared_dim), name='shared')(
          x, deterministic)
    balance = load_balance_loss(scores, ids, cfg.num_experts, valid)
    z = router_z_loss(logits, valid)
    load = expert_load(ids, cfg.num_experts, valid)
    aux = cfg.load_balance_loss * balance + cfg.router_z_loss * z
    if bias is not None:
      aux = aux + bias_update_surrogate(bias, load, cfg.router_bias_update_rate)
    routed = cfg.num_experts_per_tok * jnp.sum(valid).astype(jnp.float32)
    for name, value in (('aux_loss', aux), ('load_balance', balance), ('router_z', z),
                        ('load', load), ('dropped', dropped), ('routed', routed)):
      self.sow(MOE_COLLECTION, name, value)
    return out


def moe_metrics(stats) -> dict:
  """The sown MOE_COLLECTION of one forward pass -> {name: (sum, count)} scalars.

  moe_aux_loss: the weighted balance + z terms summed over MoE layers (added to the loss);
  moe_load_balance, moe_router_z: per-layer means; moe_load_eNN: fraction of token-expert pairs
  sent to expert NN (1 / num_experts when balanced), mean over layers; moe_dropped: fraction of
  pairs dropped (capacity dispatch, or a dropless exchange bounded by moe_exchange_factor).
  Padding tokens count nowhere. Empty for a dense model.
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
