"""The tiny presets learn on the synthetic corpus: T5 span corruption through experiments/run
(with greedy-decoding eval) and the prefix-LM preset through experiments/run beat the unigram
entropy of their targets; T5 resumed from its half-way checkpoint ends bitwise where the
straight run ends; the MLM model's masked-token accuracy beats frequency guessing."""

import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import mlm, t5
from data.pipeline import build_pipeline
from tests.conftest import REPO
from tests.helpers import checkpoint_params, read_metrics
from train.trainer import Experiment, train

STEPS = 200
# The tiny presets shrunk; the same overrides go on the command line and into in-process configs.
SHRINK = {'model.d_model': 32, 'model.num_heads': 4, 'model.num_kv_heads': 4,
          'model.head_dim': 8, 'model.mlp_dim': 64, 'data.seq_len': 64,
          'data.synthetic_train_size': 2000, 'data.synthetic_test_size': 50,
          'train.batch_size': 8, 'train.warmup_steps': 10, 'train.log_every_steps': 20,
          'train.eval_every_steps': 0, 'checkpoint.async_save': False}
T5_RUN = {**SHRINK, 'train.steps': STEPS, 'checkpoint.every_steps': STEPS // 2,
          'train.eval_every_steps': STEPS, 'train.eval_batches': 1,
          'train.eval_decode_batches': 1}


def _config(module, preset: str, overrides: dict):
  c = module.get_config(preset)
  for key, value in overrides.items():
    section, name = key.split('.')
    c[section][name] = value
  return c


def _launch(preset: str, overrides: dict, workdir) -> list[dict]:
  """experiments/run on configs/t5.py:`preset` with `overrides`; the metrics records."""
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.run', f'--config=configs/t5.py:{preset}',
       f'--workdir={workdir}', *(f'--config.{k}={v}' for k, v in overrides.items())],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return read_metrics(workdir)


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


def _unigram_entropy(counts) -> float:
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def _final_cross_entropy(records) -> float:
  """Mean over the last three logged steps (each logs one batch's loss)."""
  return float(np.mean([r['cross_entropy'] for r in records[-3:]]))


@pytest.fixture(scope='module')
def t5_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('t5')
  return workdir, _launch('tiny', T5_RUN, workdir)


def test_tiny_t5_denoises_spans_below_the_unigram_entropy_and_decodes(t5_run):
  _, records = t5_run
  config = _config(t5, 'tiny', T5_RUN)
  unigram = _unigram_entropy(_target_counts(config, 'decoder_targets', 'decoder_loss_mask'))
  final = _final_cross_entropy(records)
  assert final < 0.75 * unigram, (final, unigram, [r['loss'] for r in records])
  # The eval at the last step decoded greedily; every example starts with its first sentinel,
  # which the trained model gets right.
  last = records[-1]
  assert 'eval_loss' in last and 'eval_decode_accuracy' not in records[-2]
  assert 0.05 < last['eval_decode_accuracy'] <= 1, last
  assert 0 <= last['eval_decode_exact_match'] <= last['eval_decode_accuracy'], last


def test_tiny_t5_resumes_bitwise_from_the_half_way_checkpoint(t5_run, tmp_path):
  straight, records = t5_run
  # Resume the half-way checkpoint in a copy that never saw the second half (no eval: it
  # does not change the trained state).
  shutil.copytree(straight, tmp_path / 'resumed')
  shutil.rmtree(tmp_path / 'resumed' / 'checkpoints' / str(STEPS))
  train(_config(t5, 'tiny', {**T5_RUN, 'train.eval_every_steps': 0}), str(tmp_path / 'resumed'))
  resumed = read_metrics(tmp_path / 'resumed')
  assert resumed[-1]['step'] == STEPS and resumed[-1]['loss'] == records[-1]['loss']
  for a, b in zip(jax.tree.leaves(checkpoint_params(tmp_path / 'resumed', STEPS)),
                  jax.tree.leaves(checkpoint_params(straight, STEPS))):
    np.testing.assert_array_equal(a, b)


def test_tiny_prefix_lm_learns_below_the_unigram_entropy(tmp_path):
  overrides = {**SHRINK, 'train.steps': 120, 'checkpoint.every_steps': 120}
  records = _launch('tiny_prefix_lm', overrides, tmp_path)
  unigram = _unigram_entropy(_target_counts(_config(t5, 'tiny_prefix_lm', overrides), 'targets',
                                            'loss_mask'))
  final = _final_cross_entropy(records)
  assert final < 0.75 * unigram, (final, unigram, [r['loss'] for r in records])


def test_tiny_mlm_fills_masks_well_above_frequency_guessing(tmp_path):
  # ~15% of tokens carry loss: more steps and a larger batch than T5.
  config = _config(mlm, 'tiny', {**SHRINK, 'train.steps': 600, 'train.batch_size': 16,
                                 'checkpoint.every_steps': 600})
  counts = _target_counts(config, 'targets', 'loss_mask')
  frequency_guess = counts.max() / counts.sum()
  train(config, str(tmp_path / 'mlm'))
  history = read_metrics(tmp_path / 'mlm')
  accuracy = np.mean([r['accuracy'] for r in history[-2:]])
  assert accuracy > frequency_guess + 0.15, (accuracy, frequency_guess)


def test_decoding_eval_needs_an_encoder_decoder_objective():
  exp = Experiment.from_config(_config(mlm, 'tiny', {**SHRINK, 'train.eval_decode_batches': 1}))
  with pytest.raises(ValueError, match=r'train.eval_decode_batches=1 needs an encoder-decoder'):
    exp.jit_decode_step(None)
