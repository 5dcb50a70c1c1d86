"""Peak FLOP/s of the devices in use: measured on CPU, datasheet on accelerators."""

import functools
import time

import jax
import jax.numpy as jnp

# Dense bf16 datasheet peaks per chip, matched against jax.Device.device_kind.
DATASHEET_PEAK_FLOPS = {
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5p': 459e12,
    'TPU v5': 459e12,
    'TPU v6 lite': 918e12,
    'NVIDIA H200': 989e12,
    'NVIDIA H100': 989e12,
    'NVIDIA A100': 312e12,
}

# Accelerator memory per chip in bytes, by the short names the planner's --device takes.
GiB = 2 ** 30
DEVICE_MEMORY_BYTES = {
    'v4': 32 * GiB,
    'v5e': 16 * GiB,
    'v5p': 95 * GiB,
    'v6e': 32 * GiB,
    'a100': 80 * GiB,
    'a100-40': 40 * GiB,
    'h100': 80 * GiB,
    'h200': 141 * GiB,
    'b200': 192 * GiB,
}


def device_memory(name: str) -> int:
  """Memory of one `name` device (a DEVICE_MEMORY_BYTES key, case-insensitive) in bytes."""
  key = name.lower()
  if key not in DEVICE_MEMORY_BYTES:
    raise ValueError(f'--device={name!r} is not in train/hardware.py DEVICE_MEMORY_BYTES; '
                     f'choose one of {sorted(DEVICE_MEMORY_BYTES)} or add it there.')
  return DEVICE_MEMORY_BYTES[key]


@functools.lru_cache(maxsize=None)
def measured_cpu_peak_flops(n: int = 2048, repeats: int = 5) -> float:
  """Best f32 matmul FLOP/s of this host's CPU (all cores: XLA:CPU threads one device's op)."""
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x, device=jax.local_devices()[0])
  matmul(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def peak_flops(devices=None, remeasure: bool = False) -> float:
  """Peak FLOP/s of the whole job. CPU: the measured matmul peak per host (fake devices on one
  host share its cores), measured once per process unless `remeasure`. Accelerators: datasheet
  peak x device count."""
  devices = list(jax.devices() if devices is None else devices)
  if devices[0].platform == 'cpu':
    if remeasure:
      measured_cpu_peak_flops.cache_clear()
    return measured_cpu_peak_flops() * jax.process_count()
  kind = devices[0].device_kind
  for name, peak in DATASHEET_PEAK_FLOPS.items():
    if kind.startswith(name):
      return peak * len(devices)
  raise ValueError(f'No datasheet peak for device kind {kind!r}; add it to DATASHEET_PEAK_FLOPS.')
