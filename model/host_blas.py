"""Matmuls through Intel MKL on XLA:CPU (`model.matmul_impl='blas'`).

XLA:CPU runs f32 matmuls through YNNPACK and Eigen, which reach 140-280 GFLOP/s on the bench
shapes where MKL's sgemm reaches 290-330 (the same MKL PyTorch uses). `matmul` calls MKL from
an XLA FFI handler (host_gemm.cc) that splits each product over XLA's own intra-op threads, MKL
itself running sequentially. Dense projections, the output head and loss, and blocked
attention use it when the config asks; against the XLA path, both compiled in one process,
bench-s and bench-m train steps took 0.89-0.90x the time.

The handler is compiled with the system C++ compiler on first use, into
$SEEDLING_CACHE (default ~/.cache/seedling), and MKL comes from the `mkl` wheel
(`pip install -e .[cpu]`). f32 only, on one CPU device.
"""

import ctypes
import ctypes.util
import functools
import glob
import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Optional

import jax
import jax.numpy as jnp

_SOURCE = pathlib.Path(__file__).with_name('host_gemm.cc')
_TARGET = 'seedling_gemm'
_MKL_SEQUENTIAL = 1   # MKL_THREADING_SEQUENTIAL, for MKL_Set_Threading_Layer
IMPLS = ('xla', 'blas', 'auto')   # model.matmul_impl choices


def uses_blas(impl: str, dtype) -> bool:
  """Whether model.matmul_impl `impl` puts a product of `dtype` operands on MKL: 'blas'
  always (matmul raises where it cannot run), 'auto' where it can run. Raises, naming the
  key, on an unknown value."""
  if impl not in IMPLS:
    raise ValueError(f'model.matmul_impl={impl!r}; choose one of {IMPLS}.')
  return impl == 'blas' or (impl == 'auto' and _unusable(dtype) is None)


def _unusable(dtype) -> Optional[str]:
  """Why MKL cannot multiply `dtype` operands here (float32 on a one-device CPU mesh, MKL
  installed), as an error message; None when it can."""
  backend, mesh = jax.default_backend(), jax.sharding.get_abstract_mesh()
  if jnp.dtype(dtype) != jnp.float32:
    return (f"model.matmul_impl='blas' multiplies float32 only, got {jnp.dtype(dtype)}: set "
            "model.dtype='float32' or model.matmul_impl='xla'.")
  if backend != 'cpu':
    return (f"model.matmul_impl='blas' runs on CPU, not on this {backend!r} backend: set "
            "model.matmul_impl='xla'.")
  if not mesh.empty and mesh.size > 1:
    return (f"model.matmul_impl='blas' runs on one CPU device; the mesh has {mesh.size}: set "
            "model.matmul_impl='xla' or a one-device mesh.")
  if not mkl_installed():
    return ("model.matmul_impl='blas' needs Intel MKL: pip install -e .[cpu] (the `mkl` "
            "wheel, x86-64), or set model.matmul_impl='xla'.")
  return None


@functools.cache
def mkl_installed() -> bool:
  """Whether MKL is found (the `mkl` wheel or a system library)."""
  return _mkl_path() is not None


def _mkl_path() -> Optional[str]:
  """libmkl_rt from the `mkl` wheel (under sys.prefix/lib) or the system's library path."""
  found = sorted(glob.glob(os.path.join(sys.prefix, 'lib', 'libmkl_rt.so*')))
  return found[0] if found else ctypes.util.find_library('mkl_rt')


def _build() -> pathlib.Path:
  """The handler's shared library, compiled once per source and jaxlib version."""
  source = _SOURCE.read_bytes()
  key = hashlib.sha256(source + jax.__version__.encode()).hexdigest()[:16]
  cache = pathlib.Path(os.environ.get('SEEDLING_CACHE', pathlib.Path.home() / '.cache' /
                                      'seedling'))
  lib = cache / f'host_gemm-{key}.so'
  if lib.exists():
    return lib
  cache.mkdir(parents=True, exist_ok=True)
  compiler = os.environ.get('CXX', 'g++')
  with tempfile.TemporaryDirectory(dir=cache) as tmp:   # renamed into place: racing builds agree
    out = pathlib.Path(tmp) / lib.name
    cmd = [compiler, '-O2', '-std=c++17', '-shared', '-fPIC', '-w', f'-I{jax.ffi.include_dir()}',
           str(_SOURCE), '-o', str(out)]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
      raise RuntimeError(f"model.matmul_impl='blas' compiles {_SOURCE.name} with {compiler!r}, "
                         'which is not installed: install g++ or set CXX.') from None
    if proc.returncode:
      raise RuntimeError(f'compiling {_SOURCE} failed ({" ".join(cmd)}):\n{proc.stderr}')
    os.replace(out, lib)
  return lib


@functools.cache
def _register() -> None:
  """Builds and loads the handler, binds it to MKL's cblas_sgemm and registers the target."""
  mkl = ctypes.CDLL(_mkl_path())
  mkl.MKL_Set_Threading_Layer(_MKL_SEQUENTIAL)
  handler = ctypes.CDLL(str(_build()))
  handler.seedling_set_sgemm(ctypes.cast(mkl.cblas_sgemm, ctypes.c_void_p))
  jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(handler.SeedlingGemm), platform='cpu')


def _gemm(a: jax.Array, b: jax.Array, trans_a: bool, trans_b: bool) -> jax.Array:
  m = a.shape[-1] if trans_a else a.shape[-2]
  n = b.shape[-2] if trans_b else b.shape[-1]
  out = jax.ShapeDtypeStruct(a.shape[:-2] + (m, n), jnp.float32)
  if not a.size or not b.size:   # an empty product (or sum): BLAS takes no zero-size operand
    return jnp.zeros(out.shape, out.dtype)
  return jax.ffi.ffi_call(_TARGET, out, vmap_method='sequential')(
      a, b, trans_a=trans_a, trans_b=trans_b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _matmul(trans_a, trans_b, a, b):
  return _gemm(a, b, trans_a, trans_b)


def _matmul_fwd(trans_a, trans_b, a, b):
  return _gemm(a, b, trans_a, trans_b), (a, b)


def _matmul_bwd(trans_a, trans_b, residuals, dc):
  """C = op(A) op(B): dA = dC op(B)^T (transposed back if A was), dB likewise."""
  a, b = residuals
  da = _gemm(b, dc, trans_b, True) if trans_a else _gemm(dc, b, False, not trans_b)
  db = _gemm(dc, a, True, trans_a) if trans_b else _gemm(a, dc, not trans_a, False)
  return da, db


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
  """op(a) op(b) for f32 a, b of rank 2, or rank 3 with a shared leading batch dim; op
  transposes the last two dims when trans_a / trans_b is set. Differentiable (reverse mode)."""
  reason = _unusable(a.dtype) or _unusable(b.dtype)
  if reason:
    raise ValueError(reason)
  if a.ndim != b.ndim or a.ndim not in (2, 3) or a.shape[:-2] != b.shape[:-2]:
    raise ValueError(f'host_blas.matmul takes rank-2 operands, or rank 3 with one shared batch '
                     f'dim, got {a.shape} and {b.shape}.')
  k_a = a.shape[-2] if trans_a else a.shape[-1]
  k_b = b.shape[-1] if trans_b else b.shape[-2]
  if k_a != k_b:
    raise ValueError(f'host_blas.matmul: contracting sizes differ, {k_a} (a {a.shape}, '
                     f'trans_a={trans_a}) and {k_b} (b {b.shape}, trans_b={trans_b}).')
  _register()
  return _matmul(trans_a, trans_b, a, b)
