"""Device mesh and logical-axis sharding rules.

Model code names array dimensions by logical axes ("embed", "heads", …); `LOGICAL_RULES` maps each
to a mesh axis. Changing the parallelism is changing the mesh (or a row here), never the model.
A dimension that its mesh axes do not divide evenly is replicated instead (e.g. 8 KV heads on
tensor=16, or a batch of 1 on the engine), so every config runs, if not always optimally.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from tau2jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis, tuple of mesh axes, or None (replicated).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),  # activations: FSDP shards also split the batch (ZeRO-3 style)
    "length": None,
    "vocab": "tensor",
    "embed": "fsdp",            # weights gathered per layer inside the scan
    "heads": "tensor",
    "kv_heads": "tensor",       # replicated automatically when tensor does not divide num_kv_heads
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,             # the scanned axis must stay whole on every device
    "norm": None,
    "cache_length": None,
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """Mesh with axes ("data", "fsdp", "tensor"); one size may be -1 (= the remaining devices).
    Sizes that cannot work raise a ConfigError naming `mesh.*` (the config fields they come from)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [data, fsdp, tensor]
    given = f"mesh.data={data}, mesh.fsdp={fsdp}, mesh.tensor={tensor}"
    if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"{given}: sizes must be positive, with at most one -1 (= the remaining devices)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ConfigError(f"{given}: the {n} devices are not divisible by {known}; pick sizes whose "
                              f"product divides {n}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ConfigError(f"{given}: data*fsdp*tensor = {math.prod(sizes)} but there are {n} devices; make "
                          f"the product equal {n} or set one size to -1")
    # Auto axes: GSPMD propagates shardings; with_sharding_constraint is a hint, not an assert.
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_pspec(axes: Sequence[str | None], rules: Mapping = LOGICAL_RULES) -> P:
    """PartitionSpec for a tuple of logical axis names (None = replicated dimension)."""
    out = []
    for name in axes:
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule; add a row to LOGICAL_RULES")
        out.append(None if name is None else rules[name])
    return P(*out)


def _fit(shape: Sequence[int], spec: P, axis_sizes: Mapping[str, int]) -> P:
    """Drops the mesh axes of any dimension they do not divide (that dimension is replicated)."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        size = math.prod(axis_sizes[a] for a in names)
        out.append(entry if names and dim % size == 0 else None)
    return P(*out)


def named_sharding(mesh: Mesh, shape: Sequence[int], axes: Sequence[str | None],
                   rules: Mapping = LOGICAL_RULES) -> NamedSharding:
    return NamedSharding(mesh, _fit(shape, logical_to_pspec(axes, rules), dict(mesh.shape)))


def tree_shardings(mesh: Mesh, shapes, axes_tree, rules: Mapping = LOGICAL_RULES):
    """NamedSharding for every leaf of `shapes` (arrays or ShapeDtypeStructs) from the matching
    leaf of `axes_tree` (tuples of logical names). The caller owns the axes (e.g.
    `qwen3.param_axes`), so this module imports no model."""
    return jax.tree.map(lambda s, axes: named_sharding(mesh, s.shape, axes, rules), shapes,
                        axes_tree, is_leaf=lambda x: isinstance(x, tuple))


def batch_sharding(mesh: Mesh, rules: Mapping = LOGICAL_RULES) -> NamedSharding:
    """[B, T] input arrays: batch over ("data", "fsdp"), length replicated. B must be divisible
    by data*fsdp (jit rejects uneven input shardings)."""
    return NamedSharding(mesh, logical_to_pspec(("batch", "length"), rules))


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Mapping = LOGICAL_RULES) -> jax.Array:
    """Activation sharding hint by logical axes. A no-op unless a mesh is active
    (`with jax.set_mesh(mesh):`), so model code runs unchanged on one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = _fit(x.shape, logical_to_pspec(axes, rules), dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)
