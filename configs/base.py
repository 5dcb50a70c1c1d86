"""Sections shared by every experiment family; family files (lm.py, moe.py, ...) start here.

Every knob is declared with a one-line comment saying what it does. Family files override
values, never add keys silently: the returned config is locked by the launcher.
"""

import dataclasses

import ml_collections

from model.config import ModelConfig


def train_config() -> ml_collections.ConfigDict:
  """Steps, batch, optimizer and logging for the shared train-step builder."""
  c = ml_collections.ConfigDict()
  c.steps = 1000                 # optimizer steps to run (a resumed run stops at the same step)
  c.batch_size = 16              # global batch in sequences, across all hosts and micro-batches
  c.grad_accum_steps = 1         # micro-batches per optimizer step (batch_size must divide evenly)
  c.learning_rate = 3e-3         # peak learning rate after warmup
  c.warmup_steps = 100           # linear warmup from 0 to learning_rate
  c.decay_steps = -1             # cosine decay length; -1 = train.steps
  c.min_lr_ratio = 0.1           # final learning rate as a fraction of the peak
  c.b1 = 0.9                     # AdamW beta1
  c.b2 = 0.95                    # AdamW beta2
  c.eps = 1e-8                   # AdamW epsilon
  c.weight_decay = 0.1           # decoupled weight decay, applied to matrices only (ndim >= 2)
  c.grad_clip_norm = 1.0         # global-norm clipping; 0 disables it
  c.z_loss = 1e-4                # coefficient of log(Z)^2 added to the LM loss; 0 disables it
  c.loss_chunk_tokens = 512      # token losses form logits this many tokens at a time; 0 = all
  c.log_every_steps = 10         # metrics.jsonl / TensorBoard / progress-bar cadence
  c.eval_every_steps = 0         # evaluation cadence on the eval split; 0 disables it
  c.eval_batches = 4             # batches per evaluation
  c.eval_decode_batches = 0      # encoder-decoder: eval batches also decoded greedily and scored
  c.eval_decode_len = 0          # encoder-decoder eval decoding: tokens per example; 0 = decoder len
  return c


def mesh_config() -> ml_collections.ConfigDict:
  """Device mesh shape; -1 on one axis takes all remaining devices."""
  c = ml_collections.ConfigDict()
  c.data = -1                    # pure data parallelism (batch only)
  c.fsdp = 1                     # fully sharded data parallelism (batch and parameters)
  c.tensor = 1                   # tensor parallelism (heads, mlp, vocab)
  c.expert = 1                   # expert parallelism (MoE experts)
  c.rules = ()                   # ((logical_axis, mesh_axes), ...) that replace the default rules
  return c


def checkpoint_config() -> ml_collections.ConfigDict:
  """Orbax checkpointing under WORKDIR/checkpoints."""
  c = ml_collections.ConfigDict()
  c.every_steps = 100            # save cadence (the last step is always saved)
  c.keep = 3                     # number of most recent checkpoints kept
  c.async_save = True            # write checkpoints in the background while training continues
  return c


def data_config() -> ml_collections.ConfigDict:
  """Input pipeline (owned by data/; see data/pipeline.py and data/sources.py)."""
  c = ml_collections.ConfigDict()
  c.task = 'lm'                  # batch format: lm | sft | mlm | span_corruption | preference
  c.source = 'synthetic'         # synthetic|text:P|sft_jsonl:P|preference_jsonl:P|gsm8k:P|tfds:NAME
  c.data_dir = '~/.cache/seedling/tfds'  # file sources are prepared here once; tfds: reads here
  c.text_unit = 'file'           # text:PATH documents: one per file | one per line
  c.text_field = 'text'          # record field holding the text (json text files, tfds sources)
  c.bad_lines = 'error'          # bad source record: error (names file:line) | skip (counted)
  c.eval_fraction = 0.0          # file sources: hold out this tail fraction as the 'eval' split
  c.eval_split = ''              # tfds sources: split used for 'eval'; '' = validation or test
  c.tokenizer = 'byte'           # byte (no files; 365 ids) | sentencepiece:PATH.model | hf:FOLDER
  c.pad_id = -1                  # SentencePiece pad id; -1 = the model's own, else one appended id
  c.num_sentinels = 100          # reserved span-corruption sentinel ids
  c.chat_template = True         # sft/preference prompt/response pairs become user/assistant turns
  c.seq_len = 128                # tokens per packed row (encoder length for span_corruption)
  c.target_len = 0               # span_corruption decoder length; 0 = computed so nothing is cut
  c.packing = 'first_fit'        # first_fit (tighter, reorders within a window) | greedy (in order)
  c.pack_window = 256            # examples packed together by first_fit
  c.too_long = 'split'           # example longer than a row: split (not preference)|truncate|drop
  c.mlm_rate = 0.15              # mlm: share of text tokens selected for prediction
  c.mlm_mask_frac = 0.8          # mlm: selected tokens replaced by the mask id
  c.mlm_random_frac = 0.1        # mlm: selected tokens replaced by a random token (rest unchanged)
  c.noise_density = 0.15         # span_corruption: share of tokens corrupted
  c.mean_noise_span_length = 3.0  # span_corruption: mean corrupted span length in tokens
  c.shuffle = True               # shuffle the train split (a new order each epoch, from config.seed)
  c.num_epochs = -1              # passes over the train split; -1 = repeat forever
  c.worker_count = 0             # grain worker processes; 0 = read in the main process
  c.synthetic_train_size = 200_000  # problems in the embedded synthetic train split
  c.synthetic_test_size = 2_000  # problems in the embedded synthetic test split
  c.synthetic_seed = 0           # fixes the synthetic corpus and its train/test split
  c.synthetic_test_fraction = 0.1  # share of problem keys reserved for the test split
  c.synthetic_families = ('arithmetic', 'chickens_rabbits', 'shopping', 'travel')  # generators
  c.synthetic_levels = (1, 2, 3)  # difficulty levels drawn uniformly
  c.synthetic_languages = ('en', 'zh')  # template languages drawn uniformly
  return c


def model_config() -> ml_collections.ConfigDict:
  """The `model` section: every field of model.ModelConfig, documented there."""
  return ml_collections.ConfigDict(dataclasses.asdict(ModelConfig()))


def base_config() -> ml_collections.ConfigDict:
  """All shared sections; a family file sets `objective.name` and its presets."""
  c = ml_collections.ConfigDict()
  c.seed = 0                     # one seed: parameter init, data order and every step's RNG
  c.init_from = ''               # start from these weights: hf:/path/to/hf_folder; '' = random init
  c.model = model_config()
  c.objective = ml_collections.ConfigDict({'name': 'causal_lm'})  # loss: train.objectives
  c.train = train_config()
  c.mesh = mesh_config()
  c.checkpoint = checkpoint_config()
  c.data = data_config()
  return c
