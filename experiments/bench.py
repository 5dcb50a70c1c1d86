"""Train-step benchmarks: one JSON line per config with step time, tokens/s, MFU, compile time
and memory; `encdec-decode` times greedy KV-cached generation of the tiny T5 instead.

  python -m experiments.bench                       # every benchmark, 'auto' allocator
  python -m experiments.bench --names=bench-s,bench-m --malloc=notrim,keep --torch
  python -m experiments.bench --names=bench-s,bench-m --torch --rounds=3

Each (benchmark, allocator setting) runs in a fresh subprocess, back to back, so the lines of
one invocation are comparable. A shared machine drifts by 10-20% over minutes, so `--rounds`
runs each benchmark's frameworks in turn that many times and adds a summary line: the median
tokens/s of each over the rounds and, with `--torch`, the median over rounds of JAX's tokens/s
over the fastest PyTorch variant's in the same round. A step is timed from dispatch to
`block_until_ready` after `--warmup` untimed steps; the median of `--steps` is reported. MFU
is model FLOPs per token (model/flops.py) x tokens/s over the peak of train/hardware.py: on CPU
the higher of two f32 matmul measurements, before and after the timed steps; the datasheet
peak on GPU/TPU. `--torch` adds experiments/torch_baseline.py (eager and torch.compile) for
the dense shapes under the same settings (pip install -e .[bench]).

Allocator settings (train/host_malloc.py): `notrim` stops glibc trimming the heap top, which is
enough for PyTorch; `keep` also puts every thread on one heap that never mmaps, without which
XLA:CPU faults its per-step temporaries in afresh every step (~20% of a bench-s step);
`tcmalloc` preloads gperftools' tcmalloc, faster again for XLA:CPU. `auto` (the default here, and
what experiments.run re-executes under on CPU) is `tcmalloc` where installed, else `keep`. They
take effect at process start, hence one subprocess per (benchmark, setting); every line names
the setting it ran under.
"""

import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app, flags

from train import host_malloc

# name -> (config module, preset). Benchmarks whose config module is absent are reported as
# skipped, so the harness runs while model families are still being added.
BENCHMARKS = {
    'bench-s': ('configs.bench', 'bench-s'),
    'bench-m': ('configs.bench', 'bench-m'),
    'moe-tiny': ('configs.moe', 'tiny'),
    'moe-tiny-dense': ('configs.lm', 'tiny'),   # moe-tiny's dense twin: same active params
    't5-tiny': ('configs.t5', 'tiny'),
    'encdec-decode': ('configs.t5', 'tiny'),
}
GENERATION = ('encdec-decode',)   # time `time_generation`, not a train step
TORCH_SHAPES = ('bench-s', 'bench-m')

_NAMES = flags.DEFINE_list('names', list(BENCHMARKS), f'Benchmarks to run: {list(BENCHMARKS)}.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps per benchmark (the median is reported).')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.')
_MALLOC = flags.DEFINE_list('malloc', ['auto'], 'Allocator settings to run each benchmark under: '
                            f'{host_malloc.CHOICES} (auto: tcmalloc where installed, else keep).')
_TORCH = flags.DEFINE_bool('torch', False, 'Also time the PyTorch baseline of the dense shapes.')
_ROUNDS = flags.DEFINE_integer('rounds', 1, 'Runs of each benchmark, its frameworks in turn.')
_CHILD = flags.DEFINE_string('child', None, 'Internal: run this one benchmark in this process.')


def load_config(name: str):
  """The config of benchmark `name` (ImportError when its config module does not exist yet)."""
  if name not in BENCHMARKS:
    raise ValueError(f'--names: unknown benchmark {name!r}; choose from {list(BENCHMARKS)}.')
  module, preset = BENCHMARKS[name]
  return importlib.import_module(module).get_config(preset)


def random_batch(config, sharding, seed: int = 0) -> dict:
  """One global batch of `config.data.task` with random tokens and one segment per row."""
  import jax
  import numpy as np
  from data.pipeline import batch_spec
  rng = np.random.RandomState(seed)
  out = {}
  for k, (n, dt) in batch_spec(config).items():
    shape = (config.train.batch_size, n)
    if k.endswith('segment_ids') or k.endswith('loss_mask'):
      v = np.ones(shape, dt)
    elif k.endswith('positions'):
      v = np.broadcast_to(np.arange(n, dtype=dt), shape)
    else:
      v = rng.randint(1, config.model.vocab_size, shape).astype(dt)
    out[k] = jax.device_put(v, sharding)
  return out


def _timed(call, steps: int, warmup: int) -> tuple[list, list, object]:
  """(wall seconds, CPU seconds) of each of `steps` calls of `call()`, timed from dispatch to
  `block_until_ready` after `warmup` untimed calls, and the last call's result."""
  import jax
  times, cpu_times = [], []
  for i in range(warmup + steps):
    start, cpu_start = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(call())
    if i >= warmup:
      times.append(time.perf_counter() - start)
      cpu_times.append(time.process_time() - cpu_start)
  return times, cpu_times, out


def _memory(compiled) -> dict:
  """Compiled peak bytes (XLA's analysis) and the process's max RSS."""
  mem = compiled.memory_analysis()
  return {'compiled_peak_bytes': (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                  - mem.alias_size_in_bytes + mem.temp_size_in_bytes),
          'max_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def time_train_step(config, steps: int, warmup: int) -> dict:
  """Compiles and times `config`'s train step on the current devices; returns the JSON fields."""
  import jax
  from train.hardware import peak_flops
  from train.trainer import Experiment

  exp = Experiment.from_config(config)
  devices = list(exp.partitioner.mesh.devices.flat)
  # Measured before the steps (after a multi-GB step one measurement read half the speed, MFU
  # 1.39) and again after them; the higher counts, since a shared VM has slow phases longer
  # than one measurement (one read 83 GF/s against the usual 160-180).
  peak = peak_flops(devices)
  state, shardings = exp.partitioner.init(exp.init_state, jax.random.key(config.seed))
  batch = random_batch(config, exp.partitioner.batch_sharding)
  start = time.perf_counter()
  compiled = exp.jit_train_step(shardings).lower(state, batch).compile()
  compile_s = time.perf_counter() - start

  def step():
    nonlocal state
    state, metrics = compiled(state, batch)   # the state is donated: carry it along
    return state, metrics

  times, cpu_times, (_, metrics) = _timed(step, steps, warmup)
  peak = max(peak, peak_flops(devices, remeasure=True))
  step_s = statistics.median(times)
  tokens = config.train.batch_size * config.data.seq_len
  try:
    fpt = exp.flops_per_token()
  except ValueError:   # families without a FLOPs formula still get times and memory
    fpt = None
  return {
      'step_time_s': step_s,
      'step_time_min_s': min(times),
      # CPU seconds of all this process's threads per step: the work done, steadier than wall
      # time when other jobs share the cores.
      'step_cpu_s': statistics.median(cpu_times),
      'tokens_per_s': tokens / step_s,
      'model_flops_per_token': fpt,
      'achieved_flops_per_s': fpt * tokens / step_s if fpt else None,
      'mfu': fpt * tokens / step_s / peak if fpt else None,
      'peak_flops_per_s': peak,
      'compile_s': compile_s,
      **_memory(compiled),
      'final_loss': float(metrics['loss'][0] / metrics['loss'][1]),
      'devices': exp.partitioner.mesh.size,
      'platform': jax.devices()[0].platform,
  }


def time_generation(config, steps: int, warmup: int) -> dict:
  """Compiles and times greedy `t5_generate` (encode once, then KV-cached decoding of
  `train.eval_decode_len` or the decoder length) of one random batch of an encoder-decoder
  `config`; a generated token is one decoding step of the whole batch. Returns the JSON fields."""
  import jax
  from data.pipeline import target_length
  from model.decoding import t5_generate
  from train.trainer import Experiment

  exp = Experiment.from_config(config)
  params, shardings = exp.partitioner.init(exp.objective.init_fn, jax.random.key(config.seed))
  batch = random_batch(config, exp.partitioner.batch_sharding)
  length = config.train.eval_decode_len or target_length(config)
  generate = lambda p, b: t5_generate(
      exp.model, p, b['encoder_inputs'], b['encoder_positions'], b['encoder_segment_ids'],
      jax.random.key(0), steps=length, start_id=0)[0]
  start = time.perf_counter()
  compiled = exp.partitioner.jit(generate, in_shardings=(
      shardings, exp.partitioner.batch_sharding)).lower(params, batch).compile()
  compile_s = time.perf_counter() - start
  times, cpu_times, _ = _timed(lambda: compiled(params, batch), steps, warmup)
  call_s = statistics.median(times)
  return {
      'generate_time_s': call_s,
      'generate_time_min_s': min(times),
      'generate_cpu_s': statistics.median(cpu_times),
      'time_per_token_s': call_s / length,
      'tokens_per_s': config.train.batch_size * length / call_s,
      'generated_tokens': length,
      'batch_size': config.train.batch_size,
      'compile_s': compile_s,
      **_memory(compiled),
      'devices': exp.partitioner.mesh.size,
      'platform': jax.devices()[0].platform,
  }


def _run_child(args: list[str], env_extra: dict, tag: dict) -> dict:
  """Runs one measurement in a fresh process; returns its JSON line (or the error) plus `tag`."""
  env = dict(os.environ, **env_extra)
  proc = subprocess.run([sys.executable, '-m', *args], env=env, capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  if proc.returncode or not lines:
    return dict(tag, error=(proc.stderr or proc.stdout).strip().splitlines()[-1:])
  return dict(tag, **json.loads(lines[-1]))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _CHILD.value:
    result = {'name': _CHILD.value, 'framework': 'jax'}
    try:
      config = load_config(_CHILD.value)
    except ImportError as e:
      result['skipped'] = f'config module missing: {e}'
    else:
      timer = time_generation if _CHILD.value in GENERATION else time_train_step
      result.update(timer(config, _STEPS.value, _WARMUP.value))
    print(json.dumps(result), flush=True)
    return
  if not _MALLOC.value:
    raise app.UsageError(f'--malloc is empty: choose from {host_malloc.CHOICES}.')
  try:
    settings = [host_malloc.resolve(s) for s in _MALLOC.value]
  except ValueError as e:
    raise app.UsageError(f'--malloc: {e}') from e
  common = [f'--steps={_STEPS.value}', f'--warmup={_WARMUP.value}']
  unknown = [n for n in _NAMES.value if n not in BENCHMARKS]
  if unknown:   # before the first slow run
    raise app.UsageError(f'--names: unknown benchmarks {unknown}; choose from {list(BENCHMARKS)}.')
  if _ROUNDS.value < 1:
    raise app.UsageError(f'--rounds={_ROUNDS.value}: must be at least 1.')
  for name in _NAMES.value:
    runs = {'jax': ['experiments.bench', f'--child={name}', *common]}
    if _TORCH.value and name in TORCH_SHAPES:
      for mode in ('eager', 'compile'):
        runs[f'torch-{mode}'] = ['experiments.torch_baseline', f'--shape={name}',
                                 f'--mode={mode}', *common]
    for setting in settings:
      rounds = []
      for r in range(_ROUNDS.value):
        tag = {'malloc': setting, **({'round': r} if _ROUNDS.value > 1 else {})}
        rounds.append({})
        for label, args in runs.items():
          rounds[-1][label] = _run_child(args, host_malloc.SETTINGS[setting], tag)
          print(json.dumps(rounds[-1][label]), flush=True)
      if _ROUNDS.value > 1:
        print(json.dumps(summary(name, setting, rounds)), flush=True)


def summary(name: str, setting: str, rounds: list) -> dict:
  """Median tokens/s over `rounds` ([{framework: JSON line}]) per framework, and the median of
  the per-round ratio of JAX to the fastest PyTorch variant; failed runs are left out."""
  tps = lambda line: line.get('tokens_per_s')
  out = {'summary': name, 'malloc': setting, 'rounds': len(rounds), 'tokens_per_s': {
      label: statistics.median(v) for label in rounds[0]
      if (v := [tps(r[label]) for r in rounds if tps(r[label])])}}
  ratios = []
  for r in rounds:
    torch = [tps(line) for label, line in r.items() if label.startswith('torch') and tps(line)]
    if tps(r['jax']) and torch:
      ratios.append(tps(r['jax']) / max(torch))
  if ratios:
    out['jax_over_fastest_torch'] = statistics.median(ratios)
    out['jax_over_fastest_torch_per_round'] = ratios
  return out


if __name__ == '__main__':
  app.run(main)
