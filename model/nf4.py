"""4-bit NormalFloat (NF4) storage of frozen kernels: QLoRA's base-weight format.

A kernel is cut along one axis (a projection's last input axis) into blocks of `block`
consecutive entries. Each block keeps its absolute maximum (float32) and, per weight, the index
of the nearest of 16 levels to weight / absmax, two indices to a byte: entries 2i and 2i+1
along the axis share byte i (low and high nibble). The levels are quantiles of a standard
normal scaled to [-1, 1] with an exact zero (Dettmers et al. 2023, QLoRA), so normally
distributed weights use them about equally often. Storage is 4 + 32 / block bits per weight.

`quantize` takes numpy or jax arrays (the Hugging Face loader quantizes on the host, one
tensor at a time); `dequantize` is jax.
"""

import statistics

import jax.numpy as jnp
import numpy as np


def _levels() -> np.ndarray:
  """8 positive and 7 negative normal quantiles, evenly spaced in probability from 0.5 to
  0.9677 (which puts the outermost at the tail of the 4-bit range), zero, scaled to max 1."""
  quantile = statistics.NormalDist().inv_cdf
  top = 0.9677083
  positive = [quantile(top + (0.5 - top) * i / 8) for i in range(8)]
  negative = [-quantile(top + (0.5 - top) * i / 7) for i in range(7)]
  levels = np.sort(np.array(positive + [0.0] + negative))
  return (levels / levels.max()).astype(np.float32)


LEVELS = _levels()
PARTS = ('kernel_nf4', 'kernel_absmax')   # a quantized kernel's parameter names, in order
_MIDPOINTS = (LEVELS[1:] + LEVELS[:-1]) / 2


def quantize(w, axis: int, block: int) -> tuple:
  """(codes uint8, absmax float32) of `w` along `axis`: codes have that axis halved, absmax
  has it divided by `block` (which must divide it and be even)."""
  xp = np if isinstance(w, np.ndarray) else jnp
  w = xp.moveaxis(w, axis, 0).astype(np.float32)
  blocks = w.reshape((w.shape[0] // block, block) + w.shape[1:])
  absmax = xp.abs(blocks).max(axis=1)
  normed = blocks / xp.where(absmax > 0, absmax, 1.0)[:, None]
  index = xp.searchsorted(_MIDPOINTS, normed).astype(np.uint8).reshape(w.shape)
  codes = index[0::2] | (index[1::2] << 4)
  return xp.moveaxis(codes, 0, axis), xp.moveaxis(absmax, 0, axis)


def quantized_axis(shape: tuple, other: tuple) -> int:
  """The blocked axis: the one whose length differs between two of a quantized kernel's shapes
  (float kernel, codes or absmax)."""
  return next(a for a, (n, m) in enumerate(zip(shape, other)) if n != m)


def dequantize(codes, absmax, dtype) -> jnp.ndarray:
  """The kernel that `quantize` stored as (codes, absmax), in `dtype`."""
  axis = quantized_axis(codes.shape, absmax.shape)
  codes, absmax = jnp.moveaxis(codes, axis, 0), jnp.moveaxis(absmax, axis, 0)
  index = jnp.stack([codes & 15, codes >> 4], axis=1)
  index = index.reshape((2 * codes.shape[0],) + codes.shape[1:])
  values = jnp.asarray(LEVELS)[index]
  blocks = values.reshape((absmax.shape[0], -1) + values.shape[1:]) * absmax[:, None]
  return jnp.moveaxis(blocks.reshape(values.shape), 0, axis).astype(dtype)
