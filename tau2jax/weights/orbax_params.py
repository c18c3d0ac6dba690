"""Converted model weights on disk: ``<dir>/params/`` (Orbax) + ``<dir>/model_config.json``.

`restore_params` with a mesh restores every array straight into its `param_shardings` layout:
each host reads only the slices its devices own, nothing is gathered to one host first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from tau2jax.weights import mapping
from tau2jax.models.configs import ModelConfig
from tau2jax.models.qwen3 import param_shardings

PARAMS_DIR = "params"
CONFIG_FILE = "model_config.json"
COMMIT_MARKER = "commit_success.txt"  # Orbax writes it last: a save without it never finished
METADATA_FILE = "_METADATA"  # the tree's names, shapes and dtypes


class CheckpointFormatError(ValueError):
    """The directory is not a converted tau2jax weights checkpoint (or does not match its config)."""


def save_params(out_dir: str, params, cfg: ModelConfig) -> None:
    """Writes `params` (numpy or jax arrays) under `out_dir`. Collective on multi-host;
    `out_dir` may exist but must not contain `params/` yet."""
    out_dir = os.path.abspath(out_dir)
    _check_structure(_shapes_of(params), cfg, what="params to save")
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(out_dir, PARAMS_DIR), params)
    ckptr.wait_until_finished()
    if jax.process_index() == 0:
        write_json_atomic(os.path.join(out_dir, CONFIG_FILE), dataclasses.asdict(cfg))


def load_config(orbax_dir: str) -> ModelConfig:
    orbax_dir = os.path.abspath(orbax_dir)
    if not os.path.isdir(orbax_dir):
        raise CheckpointFormatError(f"weights directory {orbax_dir} does not exist")
    cfg_path = os.path.join(orbax_dir, CONFIG_FILE)
    if not os.path.isfile(cfg_path) or not os.path.isdir(os.path.join(orbax_dir, PARAMS_DIR)):
        raise CheckpointFormatError(
            f"{orbax_dir} is not a converted checkpoint: expected {CONFIG_FILE} and {PARAMS_DIR}/ "
            "(create one with `python -m checkpoints_tools.hf_to_orbax --hf-dir HF --out DIR`)")
    with open(cfg_path) as f:
        fields = json.load(f)
    try:
        return ModelConfig(**fields)
    except TypeError as e:
        raise CheckpointFormatError(f"{cfg_path} does not match ModelConfig: {e}") from None


def restore_params(orbax_dir: str, mesh: jax.sharding.Mesh | None = None, *, dtype=None):
    """-> (params, cfg). With `mesh`, arrays come back sharded by `param_shardings(cfg, mesh)`
    (collective in a multi-process run); without, on the first local device, read by this process
    alone. `dtype` casts while reading (None keeps the stored one)."""
    cfg = load_config(orbax_dir)
    path = os.path.join(os.path.abspath(orbax_dir), PARAMS_DIR)
    if mesh is None and jax.process_count() > 1:
        # a local copy, read by this process alone (process 0's eval engine): no barrier with the others
        me = jax.process_index()
        ckptr = ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"local_restore_{me}"))
    else:
        ckptr = ocp.StandardCheckpointer()
    check_orbax_dir(path)
    try:
        meta = ckptr.metadata(path).item_metadata
    except Exception as e:  # noqa: BLE001 - any failure to read a file on disk is the file's fault
        raise CheckpointFormatError(f"{os.path.join(path, METADATA_FILE)}: Orbax cannot read it ({_short(e)}); "
                                    "re-convert the weights or use another checkpoint") from None
    if meta is None or getattr(meta, "tree", None) is None:
        raise CheckpointFormatError(f"{os.path.join(path, METADATA_FILE)}: holds no parameter tree; "
                                    "re-convert the weights or use another checkpoint")
    stored = meta.tree
    _check_structure(jax.tree.map(lambda m: tuple(m.shape), stored, is_leaf=_is_array_meta),
                     cfg, what=path)
    if mesh is not None:
        shardings = param_shardings(cfg, mesh)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, stored, is_leaf=_is_array_meta)
    target = jax.tree.map(
        lambda m, s: jax.ShapeDtypeStruct(tuple(m.shape), jnp.dtype(dtype or m.dtype), sharding=s),
        stored, shardings, is_leaf=_is_array_meta)
    quiet_closed_loop_reports()
    try:
        params = ckptr.restore(path, target)
    except Exception as e:  # noqa: BLE001 - truncated or corrupt array files
        raise CheckpointFormatError(f"{path}: reading the weights failed ({_short(e)}); the checkpoint is corrupt "
                                    "or truncated: re-convert the weights or use another checkpoint") from None
    return params, cfg


def _drop_closed_loop(unraisable, previous) -> None:
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
        return
    previous(unraisable)


def quiet_closed_loop_reports() -> None:
    """Orbax reads in an event loop of its own and closes it when one read fails; TensorStore then
    finishes the other reads on its threads, and their callbacks, finding the loop closed, are
    reported as unraisable tracebacks of the same failure (around the one error line the CLIs
    print, in a race). Those reports alone are dropped; every other one reaches the previous hook.
    Called before each Orbax read; installs itself once."""
    if getattr(sys.unraisablehook, "drops_closed_loop", False):
        return
    previous = sys.unraisablehook
    hook = lambda unraisable: _drop_closed_loop(unraisable, previous)  # noqa: E731
    hook.drops_closed_loop = True
    sys.unraisablehook = hook


def check_orbax_dir(path: str, what: str = "the checkpoint") -> None:
    """An Orbax item directory whose save committed and whose metadata parses, else a
    CheckpointFormatError naming the file."""
    marker = os.path.join(path, COMMIT_MARKER)
    if not os.path.isfile(marker):
        raise CheckpointFormatError(f"{marker}: missing, so the save of {what} never committed (interrupted, or "
                                    "copied in part); re-create it or use another checkpoint")
    for item in (path, os.path.join(path, "state")):  # a params dir, or a train-state step's item
        meta = os.path.join(item, METADATA_FILE)
        if os.path.isfile(meta):
            try:
                with open(meta, "rb") as f:
                    json.loads(f.read())
            except (OSError, ValueError) as e:
                raise CheckpointFormatError(f"{meta}: unreadable ({_short(e)}); the checkpoint is corrupt: "
                                            "re-create it or use another checkpoint") from None
            return
    raise CheckpointFormatError(f"{meta}: missing; the checkpoint is incomplete: re-create it or use another checkpoint")


def check_finite(params, what: str) -> None:
    """Every parameter finite, else a CheckpointFormatError naming the first bad leaf."""
    flags = jax.device_get(jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), params))
    for key, ok in jax.tree_util.tree_flatten_with_path(flags)[0]:
        if not bool(ok):
            name = jax.tree_util.keystr(key, simple=True, separator="/")
            raise CheckpointFormatError(f"{what}: parameter {name} holds NaN or inf; the weights are corrupt: "
                                        "re-convert them or use another checkpoint")


def _short(e: BaseException) -> str:
    """An exception as one short line (Orbax's and TensorStore's errors run to many)."""
    text = " ".join(str(e).split()).split(" See full TensorStore details")[0]  # a spec dump, not a reason
    return f"{type(e).__name__}: {text[:300]}" + ("..." if len(text) > 300 else "")


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _is_array_meta(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _shapes_of(tree):
    return jax.tree.map(lambda x: tuple(x.shape), tree)


def _flat_shapes(shapes) -> dict[str, tuple[int, ...]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    return {jax.tree_util.keystr(k, simple=True, separator="/"): tuple(v) for k, v in leaves}


def _check_structure(shapes, cfg: ModelConfig, *, what: str) -> None:
    """Same parameter names and shapes as `cfg` implies, else an error naming the first mismatch."""
    got, want = _flat_shapes(shapes), _flat_shapes(mapping.param_shapes(cfg))
    if missing := sorted(want.keys() - got.keys()):
        raise CheckpointFormatError(f"{what}: missing parameters {missing} for this model config")
    if extra := sorted(got.keys() - want.keys()):
        raise CheckpointFormatError(f"{what}: unexpected parameters {extra} for this model config")
    for name, shape in want.items():
        if got[name] != shape:
            raise CheckpointFormatError(
                f"{what}: parameter {name} has shape {got[name]}, config implies {shape}")
