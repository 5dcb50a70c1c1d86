"""NF4 storage: the 16 levels of the QLoRA data type, a round trip within half a level gap of
each block's absmax, numpy (host loader) and jax quantizing alike, and exact levels exact."""

import jax.numpy as jnp
import numpy as np

from model import nf4


def test_levels_are_qloras_normal_float_table():
  levels = nf4.LEVELS
  assert levels.shape == (16,) and np.all(np.diff(levels) > 0)
  assert (levels[0], levels[7], levels[15]) == (-1.0, 0.0, 1.0)
  # two entries of the table published with QLoRA (bitsandbytes' NF4)
  np.testing.assert_allclose(levels[[1, 14]], [-0.6961928, 0.7229568], atol=1e-6)


def test_round_trip_error_and_numpy_equals_jax():
  w = np.random.RandomState(0).standard_t(4, (3, 96, 5)).astype(np.float32)  # heavy tails
  codes, absmax = nf4.quantize(w, 1, 16)
  assert codes.dtype == np.uint8 and codes.shape == (3, 48, 5) and absmax.shape == (3, 6, 5)
  back = np.asarray(nf4.dequantize(codes, absmax, jnp.float32))
  half_gap = np.diff(nf4.LEVELS).max() / 2
  assert np.all(np.abs(back - w) <= half_gap * np.repeat(absmax, 16, axis=1) + 1e-6)
  assert np.abs(back - w).mean() < 0.1 * np.abs(w).mean()
  jax_codes, jax_absmax = nf4.quantize(jnp.asarray(w), 1, 16)
  np.testing.assert_array_equal(np.asarray(jax_codes), codes)
  np.testing.assert_array_equal(np.asarray(jax_absmax), absmax)


def test_levels_times_absmax_come_back_exactly():
  index = np.random.RandomState(1).randint(0, 16, (8, 4))
  index[0] = 15   # each block's maximum is the top level, so absmax is the block's scale
  w = nf4.LEVELS[index] * np.array([0.5, 2.0, 3.0, 0.25], np.float32)
  codes, absmax = nf4.quantize(w, 0, 8)
  np.testing.assert_array_equal(np.asarray(nf4.dequantize(codes, absmax, jnp.float32)), w)
