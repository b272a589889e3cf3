"""Multi-host start-up, the device mesh, and logical-axis sharding rules.

One code path from one CPU to a pod: the mesh always has the four axes
(data, fsdp, tensor, expert); parameters carry logical axis names
(embed, vocab, heads, ...) and a small rules table maps them to mesh axes.
A dimension that does not divide its mesh axes is an error, never a silent
replication.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# Logical axis -> mesh axes. Parameters are stored FSDP-sharded over `embed`
# and tensor-parallel over heads / mlp / vocab; batches split over data x fsdp.
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "seq": (),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "norm": (),
    "mlp": ("tensor",),
    "experts": ("expert",),
    "sae": ("tensor",),  # SAE features: million-feature dictionaries split over tensor
    "layers": (),
    "lora": (),  # the LoRA rank: small, never split
}

_log = logging.getLogger(__name__)


def _in_multihost_environment() -> bool:
    """True inside a multi-process TPU pod slice or SLURM job."""
    if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        return True
    if os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return True
    return bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def initialize() -> None:
    """Start multi-process JAX when running on a pod or a multi-task SLURM job.

    jax.distributed.initialize() discovers the coordinator itself on Cloud TPU
    and under SLURM; JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
    cover any other cluster. A single process needs no initialisation.
    """
    if not _in_multihost_environment() or jax.distributed.is_initialized():
        return
    # CPU processes need a collectives backend of their own (accelerators bring theirs).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if coordinator:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()
    _log.info(
        "jax.distributed: process %d/%d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolve axis sizes (at most one -1) so that their product is `num_devices`."""
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
    fill = [i for i, s in enumerate(shape) if s == -1]
    if len(fill) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, shape))}")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, shape))}")
    known = math.prod(s for s in shape if s != -1)
    if fill:
        if num_devices % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))}: {num_devices} devices are not divisible by {known}")
        shape[fill[0]] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape))} has {math.prod(shape)} devices, but {num_devices} are available"
        )
    return tuple(shape)


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, expert: int = 1, *, devices: Sequence | None = None
) -> Mesh:
    """A Mesh over all (or the given) devices with the four emjax axes."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape({"data": data, "fsdp": fsdp, "tensor": tensor, "expert": expert}, len(devices))
    # Auto axes: shardings are given at jit boundaries and by constraints (GSPMD).
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == jax.device_count():
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def mesh_of(mesh_config, devices: Sequence | None = None) -> Mesh:
    """The mesh a config's `mesh` section (emjax.config.MeshConfig) describes, over all (or the given) devices."""
    return make_mesh(mesh_config.data, mesh_config.fsdp, mesh_config.tensor, mesh_config.expert, devices=devices)


def rules_of(mesh_config) -> dict[str, tuple[str, ...]]:
    """The sharding rules of a config's `mesh` section: DEFAULT_RULES, its `rules` entries replacing theirs."""
    return DEFAULT_RULES | {name: tuple(axes) for name, axes in (mesh_config.rules or {}).items()}


def auto_mesh(mesh: Mesh) -> Mesh:
    """`mesh`, checked to have the four emjax axes, with every axis Auto (same devices, same layout).

    jax.make_mesh gives Explicit axes since jax 0.8 ("sharding in types"), and
    with_sharding_constraint refuses those; emjax gives shardings at jit
    boundaries and by constraints (GSPMD), so any user mesh is taken as its Auto twin.
    """
    check_mesh_axes(mesh)
    return _auto_twin(mesh)


def _auto_twin(mesh: Mesh) -> Mesh:
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def on_auto_mesh(tree):
    """Arrays laid out on a mesh with Explicit (or Manual) axes moved onto its Auto twin; other leaves as they are.

    The layout is unchanged; only the mesh's axis types differ, so jitted code
    that constrains shardings (GSPMD) accepts inputs a user placed on a jax.make_mesh mesh.
    """

    def move(a):
        sharding = getattr(a, "sharding", None)
        if not isinstance(a, jax.Array) or not isinstance(sharding, NamedSharding):
            return a
        twin = _auto_twin(sharding.mesh)
        return a if twin is sharding.mesh else jax.device_put(a, NamedSharding(twin, sharding.spec))

    return jax.tree.map(move, tree)


def check_mesh_axes(mesh: Mesh) -> None:
    """Refuse a mesh that is not a jax.sharding.Mesh with exactly the axes (data, fsdp, tensor, expert)."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"expected a jax.sharding.Mesh with axes {MESH_AXES}, got {type(mesh).__name__}")
    names = tuple(mesh.axis_names)
    if sorted(names) != sorted(MESH_AXES):
        missing = [a for a in MESH_AXES if a not in names]
        extra = [a for a in names if a not in MESH_AXES]
        raise ValueError(
            f"the mesh has axes {names}, but emjax needs exactly {MESH_AXES}"
            + (f"; missing {tuple(missing)}" if missing else "")
            + (f"; unexpected {tuple(extra)}" if extra else "")
            + " (give absent axes size 1, e.g. emjax.distributed.make_mesh(data=..., fsdp=...))"
        )


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, Sequence[str]] | None = None,
    *,
    what: str = "array",
) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry logical axis names.

    Raises when a logical name has no rule, when a mesh axis would be used
    twice, or when a dimension is not divisible by the product of its mesh axes.
    """
    rules = DEFAULT_RULES if rules is None else rules
    check_mesh_axes(mesh)
    if len(logical_axes) != len(shape):
        raise ValueError(f"{what}: logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: dict[str, str | None] = {}
    spec = []
    for name, dim in zip(logical_axes, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"{what}: no sharding rule for logical axis {name!r}; rules cover {sorted(rules)}")
        mesh_axes = tuple(a for a in rules[name] if mesh.shape[a] > 1)
        for axis in mesh_axes:
            if axis in used:
                raise ValueError(
                    f"{what}: mesh axis {axis!r} would shard both {used[axis]!r} and {name!r} "
                    f"(logical axes {tuple(logical_axes)})"
                )
            used[axis] = name
        parts = math.prod(mesh.shape[a] for a in mesh_axes)
        if dim % parts:
            raise ValueError(
                f"{what}: dimension {name!r} of size {dim} is not divisible by mesh axes "
                f"{mesh_axes} of total size {parts} (shape {tuple(shape)}); change the mesh or the rules"
            )
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def named_sharding(logical_axes, shape, mesh, rules=None, *, what="array") -> NamedSharding:
    return NamedSharding(auto_mesh(mesh), logical_to_spec(logical_axes, shape, mesh, rules, what=what))


def batch_axes(mesh: Mesh, rules=None) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that split the batch dimension."""
    rules = DEFAULT_RULES if rules is None else rules
    check_mesh_axes(mesh)
    return tuple(a for a in rules["batch"] if mesh.shape[a] > 1)


def data_parallel_size(mesh: Mesh, rules=None) -> int:
    """How many ways the batch dimension splits: the product of the batch axes' sizes."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def global_batch(batch_size: int, mesh: Mesh, rules=None) -> int:
    """`batch_size` rounded up to a multiple of the data-parallel size, so that every global batch splits evenly
    over the batch axes (the padding rows are masked out); what extraction runs and the dry run sizes."""
    parts = data_parallel_size(mesh, rules)
    return -(-batch_size // parts) * parts


def batch_sharding(mesh: Mesh, ndim: int, rules=None) -> NamedSharding:
    """Sharding for a [batch, ...] array: the batch over the data axes, the rest replicated."""
    return NamedSharding(auto_mesh(mesh), PartitionSpec(batch_axes(mesh, rules) or None, *([None] * (ndim - 1))))


def shard_batch(batch, mesh: Mesh, rules=None):
    """Place a host batch (pytree of [B, ...] numpy arrays, this process's rows) on the mesh.

    Each process passes its own slice of the global batch (see `process_slice`);
    the result is one global array per leaf, split over the data axes.
    """
    parts = math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))

    def put(x):
        x = np.asarray(x)
        global_rows = x.shape[0] * jax.process_count()
        if global_rows % parts:
            raise ValueError(
                f"a global batch of {global_rows} rows does not divide over {parts} data shards "
                f"(mesh {dict(mesh.shape)}); choose a batch size that is a multiple of {parts}"
            )
        sharding = batch_sharding(mesh, x.ndim, rules)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)


def onto_mesh(tree, mesh: Mesh):
    """Leaves not already laid out on `mesh` (e.g. optimiser step counters) replicated over it."""
    mesh = auto_mesh(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())

    def put(a):
        on_mesh = isinstance(a.sharding, NamedSharding) and a.sharding.mesh == mesh
        return a if on_mesh else jax.device_put(a, replicated)

    return jax.tree.map(put, tree)


def padded_batches(arrays: Mapping[str, np.ndarray], batch_size: int, mesh: Mesh | None = None, rules=None):
    """Batches of rows of every array in `arrays` (each [rows, ...], one row count), `batch_size` rounded
    up to a multiple of the data shards, the last batch padded with zero rows; placed on the mesh (each
    process its own slice), or host arrays without one. Yields {name: [batch, ...]}."""
    rows = {len(a) for a in arrays.values()}
    if len(rows) != 1:
        raise ValueError(f"padded_batches: the arrays have different row counts {sorted(rows)}")
    parts = 1 if mesh is None else math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))
    batch = -(-batch_size // parts) * parts
    for lo in range(0, rows.pop(), batch):
        host = {}
        for name, a in arrays.items():
            part = np.asarray(a[lo : lo + batch])
            host[name] = np.concatenate([part, np.zeros((batch - len(part), *part.shape[1:]), part.dtype)])
        yield host if mesh is None else shard_batch({k: v[process_slice(batch)] for k, v in host.items()}, mesh, rules)


def process_slice(num_items: int) -> slice:
    """The contiguous share of `num_items` that this process reads."""
    per = -(-num_items // jax.process_count())
    start = min(num_items, per * jax.process_index())
    return slice(start, min(num_items, start + per))


def is_main_process() -> bool:
    return jax.process_index() == 0


def gather_to_host(x) -> np.ndarray:
    """A global (possibly multi-host, possibly sharded) array as one numpy array on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def sync_processes(name: str) -> None:
    """Wait for every process (only process 0 writes artifacts; the others then read them)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
