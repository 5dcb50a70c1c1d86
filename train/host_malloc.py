"""glibc malloc settings for XLA:CPU processes, and a re-exec that applies them at launch.

XLA:CPU allocates each step's temporaries (370 MB at bench-s) in one block from a worker thread.
glibc serves a block that big from a thread arena by mmap and unmaps it on free, so every step
faults all of it in again (~90k faults, ~20% of a bench-s step on these VMs). `keep` puts every
thread on one brk heap that never trims nor mmaps, and the step reuses its pages. glibc reads
these variables only at process start (mallopt at run time left 43k faults per step on two
cores), so a launcher that wants them re-executes itself under them.
"""

import importlib.metadata
import importlib.util
import os
import sys

SETTINGS = {
    'default': {},
    'notrim': {'MALLOC_TRIM_THRESHOLD_': '68719476736', 'MALLOC_TOP_PAD_': '1073741824'},
}
SETTINGS['keep'] = dict(SETTINGS['notrim'], MALLOC_ARENA_MAX='1', MALLOC_MMAP_MAX_='0')


def cpu_only() -> bool:
  """Whether JAX will run on the host CPU: JAX_PLATFORMS says 'cpu', or no accelerator plugin
  (a `jax_plugins` entry point or module, libtpu) is installed. Decided without starting a
  backend, because multi-host runs must call jax.distributed.initialize before any backend."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  if importlib.metadata.entry_points(group='jax_plugins'):
    return False
  return all(importlib.util.find_spec(m) is None for m in ('jax_plugins', 'libtpu'))


def reexec_under(setting: str) -> None:
  """Replaces this process (same PID, argv and environment) with one started under
  `SETTINGS[setting]`, unless that is a no-op. Variables the user set are kept as given."""
  env = {k: v for k, v in SETTINGS[setting].items() if k not in os.environ}
  if env:
    os.execve(sys.executable, sys.orig_argv, dict(os.environ, **env))
