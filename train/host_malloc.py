"""Host allocator settings for XLA:CPU processes, and a re-exec that applies them at launch.

XLA:CPU allocates each step's temporaries (370 MB at bench-s) in one block from a worker thread.
glibc serves a block that big from a thread arena by mmap and unmaps it on free, so every step
faults all of it in again (~90k faults, ~20% of a bench-s step on these VMs). `keep` puts every
thread on one brk heap that never trims nor mmaps, and the step reuses its pages. glibc reads
these variables only at process start (mallopt at run time left 43k faults per step on two
cores), so a launcher that wants them re-executes itself under them.

`tcmalloc` preloads gperftools' tcmalloc instead (Debian/Ubuntu: libtcmalloc-minimal4). Its
per-thread caches also take the malloc calls that XLA:CPU's matmul and fusion kernels make on
every call: under `keep` glibc's one arena spent ~5% of a bench-s step in `_int_malloc`. A bench-s
train step ran 1.12x faster than under `keep` (torch.compile's 1.02x). `auto` is `tcmalloc`
where the library is installed and `keep` elsewhere.
"""

import ctypes.util
import importlib.metadata
import importlib.util
import os
import sys

SETTINGS = {
    'default': {},
    'notrim': {'MALLOC_TRIM_THRESHOLD_': '68719476736', 'MALLOC_TOP_PAD_': '1073741824'},
}
SETTINGS['keep'] = dict(SETTINGS['notrim'], MALLOC_ARENA_MAX='1', MALLOC_MMAP_MAX_='0')
TCMALLOC = 'libtcmalloc_minimal.so.4'
# gperftools reports every allocation over 1 GB on stderr; XLA:CPU's step buffers can be bigger.
SETTINGS['tcmalloc'] = {'LD_PRELOAD': TCMALLOC,
                        'TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD': str(1 << 40)}
CHOICES = [*SETTINGS, 'auto']


def resolve(setting: str) -> str:
  """The setting `setting` names: 'auto' becomes 'tcmalloc' when the library is installed and
  'keep' otherwise. Raises, saying what to install, for 'tcmalloc' without the library."""
  installed = ctypes.util.find_library('tcmalloc_minimal') == TCMALLOC
  if setting == 'auto':
    return 'tcmalloc' if installed else 'keep'
  if setting not in SETTINGS:
    raise ValueError(f'malloc setting {setting!r}; choose one of {CHOICES}.')
  if setting == 'tcmalloc' and not installed:
    raise ValueError(f"malloc setting 'tcmalloc': {TCMALLOC} is not installed (Debian/Ubuntu: "
                     "apt install libtcmalloc-minimal4); use 'keep' or 'auto'.")
  return setting


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
  """Replaces this process (same PID, argv and environment) with one started under the
  setting `setting` resolves to, unless that is a no-op. Variables the user set are kept as
  given (an LD_PRELOAD of the user's own stays, without tcmalloc)."""
  env = {k: v for k, v in SETTINGS[resolve(setting)].items() if k not in os.environ}
  if env:
    os.execve(sys.executable, sys.orig_argv, dict(os.environ, **env))
