"""PyTorch reference for experiments/bench.py: the same Llama train step in eager or compiled
PyTorch, f32 on CPU (pip install -e .[bench] for torch).

  python -m experiments.torch_baseline --shape=bench-s --mode=compile

Same shapes (configs/bench.py), same work per step: RMSNorm, RoPE, grouped-query causal
attention, SwiGLU, untied LM head, token cross-entropy, AdamW. Prints one JSON line in
bench.py's format.
"""

import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from absl import app, flags
from torch import nn

from configs.bench import SHAPES

_SHAPE = flags.DEFINE_enum('shape', 'bench-s', list(SHAPES), 'Benchmark shape.')
_MODE = flags.DEFINE_enum('mode', 'eager', ['eager', 'compile'], 'Eager or torch.compile.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps (the median is reported).')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps after the first (compiling) one.')


class RMSNorm(nn.Module):
  def __init__(self, d, eps=1e-6):
    super().__init__()
    self.scale = nn.Parameter(torch.ones(d))
    self.eps = eps

  def forward(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale


def rope(x, cos, sin):
  """Rotates halves of the head dim ([B, H, T, D]) by position-dependent angles."""
  a, b = x.chunk(2, dim=-1)
  return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


class Layer(nn.Module):
  def __init__(self, m):
    super().__init__()
    self.h, self.kv, self.hd = m['num_heads'], m['num_kv_heads'], m['head_dim']
    d = m['d_model']
    self.attn_norm, self.mlp_norm = RMSNorm(d), RMSNorm(d)
    self.qkv = nn.Linear(d, (self.h + 2 * self.kv) * self.hd, bias=False)
    self.out = nn.Linear(self.h * self.hd, d, bias=False)
    self.wi = nn.Linear(d, 2 * m['mlp_dim'], bias=False)
    self.wo = nn.Linear(m['mlp_dim'], d, bias=False)

  def forward(self, x, cos, sin):
    b, t, _ = x.shape
    q, k, v = self.qkv(self.attn_norm(x)).split(
        [self.h * self.hd, self.kv * self.hd, self.kv * self.hd], dim=-1)
    q = rope(q.view(b, t, self.h, self.hd).transpose(1, 2), cos, sin)
    k = rope(k.view(b, t, self.kv, self.hd).transpose(1, 2), cos, sin)
    v = v.view(b, t, self.kv, self.hd).transpose(1, 2)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    x = x + self.out(a.transpose(1, 2).reshape(b, t, -1))
    gate, up = self.wi(self.mlp_norm(x)).chunk(2, dim=-1)
    return x + self.wo(F.silu(gate) * up)


class Llama(nn.Module):
  def __init__(self, m, seq_len, theta=10_000.0):
    super().__init__()
    self.embed = nn.Embedding(m['vocab_size'], m['d_model'])
    self.layers = nn.ModuleList(Layer(m) for _ in range(m['num_layers']))
    self.norm = RMSNorm(m['d_model'])
    self.head = nn.Linear(m['d_model'], m['vocab_size'], bias=False)
    half = m['head_dim'] // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float32) / half)
    angles = torch.arange(seq_len, dtype=torch.float32)[:, None] * freqs[None]
    self.register_buffer('cos', angles.cos(), persistent=False)
    self.register_buffer('sin', angles.sin(), persistent=False)

  def forward(self, ids):
    x = self.embed(ids)
    for layer in self.layers:
      x = layer(x, self.cos, self.sin)
    return self.head(self.norm(x))


def main(argv):
  del argv
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  shape = SHAPES[_SHAPE.value]
  b, t, vocab = shape['batch_size'], shape['seq_len'], shape['model']['vocab_size']
  model = Llama(shape['model'], t)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
  ids = torch.randint(0, vocab, (b, t + 1))
  inputs, targets = ids[:, :-1], ids[:, 1:]

  def step():
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(inputs).view(-1, vocab), targets.reshape(-1))
    loss.backward()
    opt.step()
    return loss

  if _MODE.value == 'compile':
    step = torch.compile(step)
  start = time.perf_counter()
  step()
  first_s = time.perf_counter() - start
  times, cpu_times = [], []
  for i in range(_WARMUP.value + _STEPS.value):
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = step()
    if i >= _WARMUP.value:
      times.append(time.perf_counter() - start)
      cpu_times.append(time.process_time() - cpu_start)
  step_s = statistics.median(times)
  print(json.dumps({'name': _SHAPE.value, 'framework': f'torch-{_MODE.value}',
                    'torch': torch.__version__, 'step_time_s': step_s,
                    'step_time_min_s': min(times), 'step_cpu_s': statistics.median(cpu_times),
                    'tokens_per_s': b * t / step_s,
                    'compile_s': first_s, 'final_loss': loss.item()}), flush=True)


if __name__ == '__main__':
  app.run(main)
