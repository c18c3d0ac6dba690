"""Orbax checkpoints of the train state, optionally with a JSON loop state (RL: step counters, task
queue, curriculum), saved every N steps, last k kept.

Saves are collective (every process calls them); Orbax writes asynchronously and commits a step
atomically, so a process killed mid-save leaves the previous step restorable. Nothing saved is per
process: a checkpoint restores under any process count and mesh (the restore target's shardings
decide the layout), and the SFT data position is re-derived from the step. Older checkpoints also
hold a per-process grain iterator item ("data"); it is ignored.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import orbax.checkpoint as ocp

from tau2jax import config as config_lib
from tau2jax.parallel import host_gather
from tau2jax.weights.orbax_params import CheckpointFormatError, _short, check_orbax_dir, quiet_closed_loop_reports


class Checkpointer:
    def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, max_to_keep=keep, create=True,
            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, *, meta: dict | None = None, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if meta is not None:
            items["meta"] = ocp.args.JsonSave(meta)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state):
        """Restores the state into the shardings of `abstract_state` (ShapeDtypeStructs), whatever
        mesh or process count saved it. A step that does not read back is a CheckpointFormatError
        naming its directory; one saved with other shapes, a ConfigError naming the parameter."""
        self.check_step(step, abstract_state)
        quiet_closed_loop_reports()
        try:
            return self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state))).state
        except (MemoryError, jax.errors.JaxRuntimeError):
            raise  # out of host or device memory: the machine's problem, not the files' (no set-aside)
        except Exception as e:  # noqa: BLE001 - truncated or corrupt array files
            raise CheckpointFormatError(f"{self.step_dir(step)}: reading the train state failed ({_short(e)})") from None

    def restore_meta(self, step: int) -> dict:
        """The JSON loop state saved with `step` (`save(..., meta=...)`)."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # noqa: BLE001
            raise CheckpointFormatError(f"{self.step_dir(step)}/meta: reading the loop state failed ({_short(e)})") from None

    def check_step(self, step: int, abstract_state) -> None:
        """The step committed, its metadata parses, and every array has the shape `abstract_state`
        has (else a ConfigError: the model or optimizer changed since the save, not the file)."""
        check_orbax_dir(self.step_dir(step), f"step {step}")
        try:
            stored = ocp.StandardCheckpointer().metadata(os.path.join(self.step_dir(step), "state")).item_metadata
            stored = getattr(stored, "tree", None)
        except Exception as e:  # noqa: BLE001
            raise CheckpointFormatError(f"{self.step_dir(step)}/state: Orbax cannot read its metadata ({_short(e)})") from None
        if stored is None:
            raise CheckpointFormatError(f"{self.step_dir(step)}/state: no metadata (the save did not finish)")
        saved = _flat_shapes(stored)
        for name, shape in _flat_shapes(abstract_state).items():
            if name in saved and saved[name] != shape:
                raise config_lib.ConfigError(
                    f"config.model: checkpoint step {step} in {self.directory} has {name} of shape {saved[name]}, "
                    f"this config's model has {shape}; resume with the model settings that saved it, or use a "
                    "new config.workdir")

    def restore_latest(self, abstract_state, *, meta: bool = False):
        """-> (step, state, loop state or None) from the newest step that reads back, or (None, None, None)
        without any. A newer step that does not read back is moved aside (kept, as `N.bad-<time>`) with
        one warning line naming it and the step used; none readable is a CheckpointFormatError."""
        bad = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            error = None
            try:
                state = self.restore(step, abstract_state)
                loop = self.restore_meta(step) if meta else None
            except CheckpointFormatError as e:
                error = e
            # Each process reads its own shards, so a damaged file may fail on some processes only:
            # all agree that the step is bad, or they would go on from different steps and hang.
            failed = [m for m in host_gather.allgather(f"checkpoint_step_{step}", error and str(error)) if m]
            if failed:
                bad.append((step, error or CheckpointFormatError(failed[0])))
                continue
            if bad:
                kept = self._set_aside([s for s, _ in bad])
                print(f"warning: checkpoint step {bad[0][0]} in {self.directory} does not read back ({bad[0][1]}); "
                      f"resuming from step {step}, the newest good one (set aside as {kept})",
                      file=sys.stderr, flush=True)
            return step, state, loop
        if bad:
            raise CheckpointFormatError(f"{bad[0][1]}; no other checkpoint in {self.directory} reads back either: "
                                        "move the directory aside to start over")
        return None, None, None

    def _set_aside(self, steps: list[int]) -> str:
        """Renames unreadable step dirs out of Orbax's way (a save of the same step would collide)."""
        stamp = host_gather.allgather("checkpoint_set_aside", int(time.time()))[0]  # process 0's: one name
        names = [f"{s}.bad-{stamp}" for s in steps]
        if jax.process_index() == 0:
            for s, name in zip(steps, names):
                os.replace(self.step_dir(s), os.path.join(self.directory, name))
        host_gather.allgather("checkpoint_set_aside_done", True)  # renamed before any process reloads
        self.manager.reload()
        return ", ".join(names)

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings, for restoring without materialising."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _flat_shapes(tree) -> dict[str, tuple]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {jax.tree_util.keystr(k, simple=True, separator="/"): tuple(x.shape) for k, x in leaves
            if hasattr(x, "shape")}
