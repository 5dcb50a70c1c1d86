"""glibc malloc settings for training processes: keep freed memory for the next step.

XLA:CPU allocates each step's temporaries as one block from its worker threads. glibc serves a
block that large from a thread's arena only by mmap, and returns it to the OS on free, so every
step faults it in again: 90k page faults (~20% of the time) per bench-s step on the development
VMs. One arena that grows by brk, no mmap and no trimming keep that memory in the process, at
the cost of never returning the peak to the OS (what a training process wants anyway).
"""

import ctypes

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 36),
            (_M_TOP_PAD, 1 << 30))


def keep_freed_memory() -> bool:
  """Applies SETTINGS with mallopt; call before JAX starts its threads (its first computation).
  Returns False, changing nothing, where the C library is not glibc."""
  try:
    libc = ctypes.CDLL(None)
  except (OSError, TypeError):   # no C library to open by that name (Windows)
    return False
  if not hasattr(libc, 'gnu_get_libc_version'):   # musl, macOS: their malloc is left alone
    return False
  return all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
