"""Hugging Face checkpoints in and out (Llama 1/2/3, Mistral, Qwen2/2.5, Mixtral, original
T5; BERT/RoBERTa in only).

`load_config(folder)` -> ModelConfig; `load_params(folder, cfg, shardings)` -> params placed
tensor by tensor in their shardings; `export(folder, cfg, params)` writes a folder that
transformers loads. Only local folders are read; nothing is downloaded.
"""

from model.hf.convert import (abstract_params, export, init_params, load_config, load_params,
                              read_hf_config)
from model.hf.families import SUPPORTED

__all__ = ['SUPPORTED', 'abstract_params', 'export', 'init_params', 'load_config', 'load_params',
           'read_hf_config']
