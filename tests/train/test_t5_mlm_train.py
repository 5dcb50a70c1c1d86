"""The tiny T5 (span corruption) and tiny MLM presets train through the trainer on the
synthetic corpus: loss/accuracy beat the unigram/frequency baselines of the same batches, and
resuming from the half-way checkpoint ends bitwise where the straight run ends."""

import shutil

import jax
import numpy as np

from configs import mlm, t5
from data.pipeline import build_pipeline
from tests.helpers import checkpoint_params, read_metrics
from train.trainer import Experiment, train

STEPS = 160


def _config(module, steps=STEPS):
  c = module.get_config('tiny')
  c.model.update(d_model=32, num_heads=4, num_kv_heads=4, head_dim=8, mlp_dim=64)
  c.data.update(seq_len=64, synthetic_train_size=2000, synthetic_test_size=50)
  c.train.update(steps=steps, batch_size=8, warmup_steps=10, log_every_steps=20)
  c.checkpoint.update(every_steps=steps // 2, async_save=False)
  return c


def _target_counts(config, targets_key, mask_key, batches=20):
  """Counts of each target id under the loss mask over the first train batches."""
  exp = Experiment.from_config(config)
  pipeline = build_pipeline(config, exp.partitioner.batch_sharding, split='train',
                            model_vocab_size=config.model.vocab_size)
  counts = np.zeros(config.model.vocab_size)
  for _, batch in zip(range(batches), pipeline):
    mask = np.asarray(batch[mask_key]) > 0
    np.add.at(counts, np.asarray(batch[targets_key])[mask], 1)
  pipeline.close()
  return counts


def _run(config, workdir):
  train(config, str(workdir))
  return read_metrics(workdir)


def test_tiny_t5_denoises_spans_below_the_unigram_entropy_and_resumes_exactly(tmp_path):
  config = _config(t5)
  counts = _target_counts(config, 'decoder_targets', 'decoder_loss_mask')
  p = counts[counts > 0] / counts.sum()
  unigram = float(-(p * np.log(p)).sum())
  straight = _run(config, tmp_path / 'straight')
  final = np.mean([r['cross_entropy'] for r in straight[-2:]])
  assert final < 0.75 * unigram, (final, unigram, [r['loss'] for r in straight])
  # Resume the half-way checkpoint in a copy that never saw the second half.
  shutil.copytree(tmp_path / 'straight', tmp_path / 'resumed')
  shutil.rmtree(tmp_path / 'resumed' / 'checkpoints' / str(STEPS))
  resumed = _run(config, tmp_path / 'resumed')
  assert resumed[-1]['step'] == STEPS and resumed[-1]['loss'] == straight[-1]['loss']
  for a, b in zip(jax.tree.leaves(checkpoint_params(tmp_path / 'resumed', STEPS)),
                  jax.tree.leaves(checkpoint_params(tmp_path / 'straight', STEPS))):
    np.testing.assert_array_equal(a, b)


def test_tiny_mlm_fills_masks_well_above_frequency_guessing(tmp_path):
  config = _config(mlm, steps=600)   # ~80 masked tokens a step: more steps than T5
  config.train.batch_size = 16
  counts = _target_counts(config, 'targets', 'loss_mask')
  frequency_guess = counts.max() / counts.sum()
  history = _run(config, tmp_path / 'mlm')
  accuracy = np.mean([r['accuracy'] for r in history[-2:]])
  assert accuracy > frequency_guess + 0.15, (accuracy, frequency_guess)
