"""Greedy generation from an imported folder equals transformers' greedy generate."""

import shutil


from experiments.generate import HFModel

PROMPTS = [[5, 17, 99, 3, 42], [7, 250]]
NEW = 5


def test_greedy_matches_transformers(hf_models, qwen_like, tmp_path):
  import torch
  folder, model = hf_models['qwen2']
  local = tmp_path / 'qwen2'
  shutil.copytree(folder, local)
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    shutil.copy(f'{qwen_like}/{name}', local / name)
  loaded = HFModel.load(str(local), mesh={'fsdp': 4, 'tensor': 2})
  ours = loaded.generate_ids(PROMPTS, NEW)
  for prompt, got in zip(PROMPTS, ours):
    with torch.no_grad():
      want = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, min_new_tokens=NEW,
                            do_sample=False, eos_token_id=loaded.tokenizer.eos_id,
                            pad_token_id=loaded.tokenizer.pad_id)[0, len(prompt):].tolist()
    eos = loaded.tokenizer.eos_id
    assert got == (want[:want.index(eos) + 1] if eos in want else want)
  assert isinstance(loaded.complete('the lazy', 4), str)
