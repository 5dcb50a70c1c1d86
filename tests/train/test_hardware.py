"""The CPU peak behind MFU: measured once per process, again when asked."""

import jax

from train.hardware import measured_cpu_peak_flops, peak_flops


def test_cpu_peak_is_cached_until_remeasured():
  devices = jax.devices()[:1]
  measured_cpu_peak_flops.cache_clear()
  first = peak_flops(devices)
  assert first > 0 and peak_flops(devices) == first
  assert measured_cpu_peak_flops.cache_info()[:2] == (1, 1)   # (hits, misses)
  assert peak_flops(devices, remeasure=True) > 0
  assert measured_cpu_peak_flops.cache_info()[:2] == (0, 1)   # a fresh measurement
