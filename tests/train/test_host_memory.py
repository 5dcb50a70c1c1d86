"""keep_freed_memory: XLA:CPU's per-call temporaries stop being faulted in afresh every call."""

import subprocess
import sys

from tests.conftest import REPO

PROGRAM = '''
import resource, sys
from train.host_memory import keep_freed_memory
assert keep_freed_memory() if sys.argv[1] == 'keep' else True
import jax, jax.numpy as jnp
x = jnp.ones((8192, 4096)); w = jnp.ones((4096, 8))
f = jax.jit(lambda x, w: jnp.sin(x) @ w)   # sin(x): a 128 MiB temporary
for _ in range(2):
  f(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f(x, w).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


def faults_of_a_third_call(setting: str) -> int:
  out = subprocess.run([sys.executable, '-c', PROGRAM, setting], cwd=REPO, check=True,
                       capture_output=True, text=True, env={'JAX_PLATFORMS': 'cpu',
                                                            'PATH': '/usr/bin:/bin'})
  return int(out.stdout.split()[-1])


def test_kept_memory_is_not_faulted_in_again():
  pages = (128 << 20) // 4096
  default, kept = faults_of_a_third_call('default'), faults_of_a_third_call('keep')
  assert default > pages / 2   # glibc maps and unmaps the temporary on every call
  assert kept < pages / 20
