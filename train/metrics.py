"""Run metrics: DIR/metrics.jsonl, TensorBoard events under DIR/tensorboard, a progress bar."""

import json
import os
import sys
from typing import Optional

import tqdm


def _summary_writer():
  """tensorboardX's SummaryWriter, imported with torch hidden: tensorboardX imports torch when
  it is installed (3 s per launcher process) only to accept torch tensors; we log floats."""
  hide = 'torch' not in sys.modules
  if hide:
    sys.modules['torch'] = None   # makes `import torch` raise ImportError, which it handles
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hide:
      del sys.modules['torch']
  return SummaryWriter


def truncate_metrics(path: str, last_step: int) -> None:
  """Drops records after `last_step`, so a resumed run's log reads as one uninterrupted run."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    kept = [line for line in f if line.strip() and json.loads(line)['step'] <= last_step]
  with open(path, 'w') as f:
    f.writelines(kept)


class MetricsWriter:
  """Writes each logged step to every sink; only the process that `is_main` writes anything."""

  def __init__(self, workdir: str, total_steps: int, start_step: int, is_main: bool):
    self._main = is_main
    self._jsonl: Optional[object] = None
    if not is_main:
      return
    path = os.path.join(workdir, 'metrics.jsonl')
    truncate_metrics(path, start_step)
    self._jsonl = open(path, 'a')
    self._tb = _summary_writer()(os.path.join(workdir, 'tensorboard'))
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit='step', dynamic_ncols=True)

  def write(self, step: int, values: dict) -> None:
    if not self._main:
      return
    record = {'step': int(step), **{k: float(v) for k, v in values.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    for k, v in values.items():
      self._tb.add_scalar(k, v, step)
    self._tb.flush()
    self._bar.set_postfix({k: f'{record[k]:.4g}' for k in ('loss', 'tokens_per_s', 'mfu')
                           if k in record})
    self._bar.update(step - self._bar.n)

  def close(self) -> None:
    if self._main:
      self._jsonl.close()
      self._tb.close()
      self._bar.close()
