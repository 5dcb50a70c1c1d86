"""Rotary embedding: values, and sin/cos computed once per call when compiled for CPU."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from model.layers import apply_rope


def _reference(x, positions, theta):
  half = x.shape[-1] // 2
  freq = theta ** (-np.arange(half) / half)
  angle = positions[..., None, None].astype(np.float64) * freq         # [B, L, 1, half]
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                         x2 * np.cos(angle) + x1 * np.sin(angle)], axis=-1)


def test_rope_rotates_pairs_by_position():
  x = np.random.default_rng(0).normal(size=(2, 5, 3, 8)).astype(np.float32)
  positions = np.array([[0, 1, 2, 3, 4], [7, 8, 0, 1, 2]])
  out = jax.jit(apply_rope, static_argnums=2)(x, positions, 10_000.0)
  np.testing.assert_allclose(out, _reference(x, positions, 10_000.0), atol=1e-5)


def _computations(hlo: str) -> dict:
  """Compiled HLO text -> {computation name: its instruction lines}."""
  comps, name = {}, None
  for line in hlo.splitlines():
    if line and not line.startswith(' ') and line.rstrip().endswith('{'):
      name = line.split()[1] if line.startswith('ENTRY') else line.split()[0]
      comps[name] = []
    elif name and line.startswith(' '):
      comps[name].append(line)
  return comps


def test_rope_tables_are_not_fused_into_the_rotation():
  """XLA:CPU would fuse sin/cos into each use of the tables (forward and backward), computing
  them for every head and both halves; they must be computed over [B, L, D/2] only."""
  b, t, d = 2, 64, 32

  def loss(xs, positions):
    return sum(jnp.sum(apply_rope(x, positions, 10_000.0) ** 2) for x in xs)

  xs = [jnp.ones((b, t, h, d)) for h in (4, 1)]
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  hlo = jax.jit(jax.grad(loss)).lower(xs, positions).compile().as_text()
  with_sine = [lines for lines in _computations(hlo).values()
               if any(' sine(' in line for line in lines)]
  assert with_sine
  for lines in with_sine:
    sizes = [int(np.prod([int(n) for n in dims.split(',') if n]))
             for dims in re.findall(r'= f32\[([\d,]*)\]', ' '.join(lines))]
    assert max(sizes) <= b * t * d // 2, lines
