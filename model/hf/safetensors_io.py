"""Safetensors read tensor by tensor (memory-mapped, nothing loaded until sliced) and write.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then raw little-endian bytes. Reading it directly (rather than through a
framework) keeps bfloat16 exact via ml_dtypes and lets a caller slice before copying.
"""

import glob
import json
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
          'BF16': ml_dtypes.bfloat16, 'I64': np.int64, 'I32': np.int32, 'I16': np.int16,
          'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX = 'model.safetensors.index.json'


class Checkpoint:
  """The tensors of a Hugging Face folder: names, shapes and lazy numpy views."""

  def __init__(self, folder: str, allow_pickle: bool = False):
    self.folder = folder
    self._files: dict[str, tuple[str, dict, int]] = {}   # name -> (file, entry, data start)
    self._pickled: dict[str, np.ndarray] = {}
    index = os.path.join(folder, INDEX)
    if os.path.exists(index):
      with open(index) as f:
        files = sorted(set(json.load(f)['weight_map'].values()))
      files = [os.path.join(folder, name) for name in files]
    else:
      files = sorted(glob.glob(os.path.join(folder, '*.safetensors')))
    if not files:
      self._load_pickles(allow_pickle)
    for path in files:
      with open(path, 'rb') as f:
        n = struct.unpack('<Q', f.read(8))[0]
        header = json.loads(f.read(n))
      for name, entry in header.items():
        if name != '__metadata__':
          self._files[name] = (path, entry, 8 + n)

  def _load_pickles(self, allow_pickle: bool) -> None:
    bins = sorted(glob.glob(os.path.join(self.folder, '*.bin')))
    if not bins:
      raise FileNotFoundError(f'{self.folder} holds no *.safetensors (nor {INDEX}); expected a '
                              'Hugging Face model folder saved with save_pretrained().')
    if not allow_pickle:
      raise ValueError(f'{self.folder} holds only pickle checkpoints ({os.path.basename(bins[0])}'
                       ', ...), which can run arbitrary code when loaded. Convert them to '
                       'safetensors, or pass allow_pickle=True if you trust the source.')
    import torch   # pickles are torch state dicts; only this opt-in path needs torch
    for path in bins:
      for name, t in torch.load(path, map_location='cpu', weights_only=True).items():
        self._pickled[name] = t.float().numpy() if t.is_floating_point() else t.numpy()

  def names(self) -> set[str]:
    return set(self._files) | set(self._pickled)

  def shape(self, name: str) -> tuple[int, ...]:
    if name in self._pickled:
      return self._pickled[name].shape
    return tuple(self._files[name][1]['shape'])

  def read(self, name: str) -> np.ndarray:
    """A read-only memory-mapped view of one tensor (pages load only when touched)."""
    if name in self._pickled:
      return self._pickled[name]
    path, entry, start = self._files[name]
    if entry['dtype'] not in DTYPES:
      raise ValueError(f'{path}: tensor {name} has dtype {entry["dtype"]}, which seedling '
                       f'cannot read; readable: {sorted(DTYPES)}.')
    begin, end = entry['data_offsets']
    shape = tuple(entry['shape'])
    if begin == end:
      return np.zeros(shape, DTYPES[entry['dtype']])
    return np.memmap(path, DTYPES[entry['dtype']], 'r', start + begin, shape)


def write(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
  """Writes `tensors` (name -> array) as one safetensors file."""
  header, offset = {}, 0
  if metadata:
    header['__metadata__'] = metadata
  arrays = {}
  for name in sorted(tensors):
    arr = np.ascontiguousarray(tensors[name])
    if arr.dtype not in NAMES:
      raise ValueError(f'tensor {name} has dtype {arr.dtype}; writable: {sorted(NAMES)}')
    arrays[name] = arr
    header[name] = {'dtype': NAMES[arr.dtype], 'shape': list(arr.shape),
                    'data_offsets': [offset, offset + arr.nbytes]}
    offset += arr.nbytes
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)   # data starts 8-byte aligned
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)))
    f.write(blob)
    for arr in arrays.values():
      f.write(arr.tobytes())
