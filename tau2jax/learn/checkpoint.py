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

import jax
import orbax.checkpoint as ocp


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
        mesh or process count saved it."""
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))).state

    def restore_meta(self, step: int) -> dict:
        """The JSON loop state saved with `step` (`save(..., meta=...)`)."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings, for restoring without materialising."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
