"""The sharding spec layer: mesh, logical-axis rules, and every jitted function's shardings.

Models name logical axes only. This module maps them onto a mesh with one ordered rules table
(the first rule whose mesh axes are still free wins, so a name may appear twice as a fallback),
and `Partitioner` is the single object that jits init, train, eval and generation functions
with in/out shardings and donation. A new objective adds a loss function, never a new path here.
"""

import contextlib
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor', 'expert')

# Order matters: 'expert' claims its mesh axis before 'batch' (so expert-major MoE tensors
# keep their expert sharding and fall back to data/fsdp for the batch); activations' 'embed'
# finds 'fsdp' taken by 'batch' and stays unsharded, while parameters' 'embed' gets 'fsdp'.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ('expert', 'expert'),
    ('batch', ('data', 'fsdp', 'expert')),
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),
    ('layers', None),
    ('norm', None),
    ('relpos_buckets', None),
    ('cache_batch', ('data', 'fsdp', 'expert')),
    ('cache_batch', ('data', 'fsdp')),
    ('cache_length', None),
    ('cache_heads', 'tensor'),
    ('cache_head_dim', None),
)

# Parameters this small are cheap to replicate; the replication check ignores them.
REPLICATION_REPORT_MIN_SIZE = 1024


def mesh_shape(requested: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves the `mesh` config section (-1 = all remaining devices) to a full shape."""
  sizes = [int(requested[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}.')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'mesh: axis sizes must be positive or -1, got '
                     f'{dict(zip(MESH_AXES, sizes))}.')
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ValueError(f'mesh: the fixed axes {dict(zip(MESH_AXES, sizes))} multiply to '
                       f'{fixed}, which does not divide the {num_devices} devices.')
    sizes[sizes.index(-1)] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f'mesh: {dict(zip(MESH_AXES, sizes))} needs {fixed} devices but '
                     f'{num_devices} exist; set one axis to -1 or change the sizes.')
  return tuple(sizes)


def _host_axis(shape: tuple[int, ...], hosts: int) -> int:
  """Index of the data-parallel axis ('data', else 'fsdp') that spans the hosts."""
  for axis in ('data', 'fsdp'):
    if shape[MESH_AXES.index(axis)] % hosts == 0:
      return MESH_AXES.index(axis)
  raise ValueError(f'mesh: {dict(zip(MESH_AXES, shape))} spans {hosts} hosts, but neither '
                   f'mesh.data nor mesh.fsdp is a multiple of {hosts}; data-parallel axes go '
                   'across hosts and model axes stay inside one.')


def make_mesh(requested: dict[str, int], devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A mesh over `devices` (default: all) with Auto axis types, as linen's constraints need.

  Devices of several processes (multi-host) are laid out so that the host boundary falls on a
  data-parallel axis ('data', else 'fsdp') and tensor/expert traffic stays inside a host.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(requested, len(devices))
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  hosts = len({d.process_index for d in devices})
  if hosts == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  i = _host_axis(shape, hosts)
  per_host = shape[:i] + (shape[i] // hosts,) + shape[i + 1:]
  across = tuple(hosts if j == i else 1 for j in range(len(shape)))
  grid = mesh_utils.create_hybrid_device_mesh(per_host, across, devices, process_is_granule=True)
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


def _ways(mesh: Mesh, axes) -> int:
  """How many pieces one dim splits into over `axes` (None, one axis name or a tuple)."""
  if axes is None:
    return 1
  return math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


class Partitioner:
  """Owns the mesh and the rules; turns logical annotations into shardings and jits with them."""

  def __init__(self, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
    self.mesh = mesh
    self.rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                       for name, axes in rules)
    known = set(MESH_AXES)
    for name, axes in self.rules:
      for axis in (axes if isinstance(axes, tuple) else (axes,)):
        if axis is not None and axis not in known:
          raise ValueError(f'mesh.rules: rule for {name!r} names mesh axis {axis!r}; mesh axes '
                           f'are {MESH_AXES}.')

  @classmethod
  def from_config(cls, config, devices: Optional[Sequence[Any]] = None) -> 'Partitioner':
    """Mesh from `config.mesh`; `config.mesh.rules`, when non-empty, replaces the default table."""
    mesh = make_mesh({a: config.mesh[a] for a in MESH_AXES}, devices)
    return cls(mesh, tuple(config.mesh.rules) or DEFAULT_RULES)

  @contextlib.contextmanager
  def activate(self):
    """Mesh and rules in scope, as linen's logical constraints need while tracing."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def spec(self, logical_axes: Sequence[Optional[str]]) -> P:
    """PartitionSpec for one array from its logical axis names."""
    return nn.logical_to_mesh_axes(tuple(logical_axes), self.rules)

  def sharding(self, logical_axes: Sequence[Optional[str]]) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(logical_axes))

  @property
  def batch_sharding(self) -> NamedSharding:
    """Leading dim over the batch axes, the rest replicated; fits a batch leaf of any rank."""
    return NamedSharding(self.mesh, P(self.spec(('batch',))[0]))

  @property
  def batch_shards(self) -> int:
    """How many ways the batch dimension is split."""
    return _ways(self.mesh, self.spec(('batch',))[0])

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def tree_shardings(self, boxed_abstract_tree) -> Any:
    """NamedShardings for a tree whose leaves may be logically boxed (from eval_shape of init).

    Unboxed leaves are replicated. The result matches the tree with boxes removed.
    """
    specs = nn.get_partition_spec(boxed_abstract_tree)
    return nn.logical_to_mesh_sharding(specs, self.mesh, self.rules)

  def check_divisible(self, boxed_abstract_tree) -> None:
    """Raises, before any compile, if an annotated dim cannot be split over its mesh axes."""
    shardings = self.tree_shardings(boxed_abstract_tree)
    abstract = nn.meta.unbox(boxed_abstract_tree)
    logical = nn.get_partition_spec(boxed_abstract_tree)
    problems = []
    for (path, leaf), sharding, names in zip(
        jax.tree_util.tree_leaves_with_path(abstract), jax.tree.leaves(shardings),
        jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, P))):
      for dim, (size, axes) in enumerate(zip(leaf.shape, sharding.spec)):
        ways = _ways(self.mesh, axes)
        if size % ways:
          problems.append(f'{_path_str(path)} dim {dim} (logical {names[dim]!r}) has size {size}, '
                          f'not divisible by mesh axes {axes} of size {ways}')
    if problems:
      raise ValueError('Cannot shard on mesh ' + str(dict(self.mesh.shape)) + ':\n  ' +
                       '\n  '.join(problems) + '\nChange the mesh or the model sizes, or map the '
                       'logical axis elsewhere with mesh.rules.')

  def replicated_params(self, shardings, abstract_params) -> list[str]:
    """Paths of parameters (>= REPLICATION_REPORT_MIN_SIZE elements) left fully replicated on a
    mesh that has model-parallel axes (fsdp, tensor or expert larger than 1)."""
    if all(self.mesh.shape[a] == 1 for a in ('fsdp', 'tensor', 'expert')):
      return []
    out = []
    for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(abstract_params),
                                      jax.tree.leaves(shardings)):
      if (np.prod(leaf.shape) >= REPLICATION_REPORT_MIN_SIZE
          and all(_ways(self.mesh, axes) == 1 for axes in sharding.spec)):
        out.append(_path_str(path))
    return out

  def jit(self, fn: Callable, in_shardings=None, out_shardings=None,
          donate_argnums: Sequence[int] = (), static_argnums: Sequence[int] = ()) -> 'MeshJitted':
    """`jax.jit` with shardings and donation, traced and run with this mesh and rules active."""
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                     donate_argnums=tuple(donate_argnums), static_argnums=tuple(static_argnums))
    return MeshJitted(jitted, self)

  def init(self, init_fn: Callable[..., Any], *args) -> tuple[Any, Any]:
    """Runs `init_fn(*args)` (returning a logically boxed tree) directly into its sharded layout.

    Returns (unboxed sharded tree, its shardings). No full copy ever exists on the host or on
    one device: the jitted init writes each shard where it lives.
    """
    _, shardings = self.abstract(init_fn, *args)
    tree = self.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return tree, shardings

  def abstract(self, init_fn: Callable[..., Any], *args) -> tuple[Any, Any]:
    """(ShapeDtypeStructs carrying their shardings, shardings) of `init_fn(*args)`, unrun."""
    with self.activate():
      boxed = jax.eval_shape(init_fn, *args)
    self.check_divisible(boxed)
    shardings = self.tree_shardings(boxed)
    structs = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                           nn.meta.unbox(boxed), shardings)
    return structs, shardings


class MeshJitted:
  """A jitted function that enters its partitioner's mesh and rules on every call and lower."""

  def __init__(self, jitted, partitioner: Partitioner):
    self._jitted = jitted
    self._partitioner = partitioner

  def __call__(self, *args):
    with self._partitioner.activate():
      return self._jitted(*args)

  def lower(self, *args):
    """AOT lowering (for compile-time and memory planning) under the same mesh and rules."""
    with self._partitioner.activate():
      return self._jitted.lower(*args)
