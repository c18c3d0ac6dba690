"""Orbax checkpoints of the train state plus the data iterator (SFT) or a JSON loop state (RL: step
counters, task queue, curriculum), saved every N steps, last k kept.

Saves are collective (every process calls them); Orbax writes asynchronously and commits a step
atomically, so a process killed mid-save leaves the previous step restorable.
"""

from __future__ import annotations

import os

import grain
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

    def save(self, step: int, state, data_iter=None, *, meta: dict | None = None, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        if meta is not None:
            items["meta"] = ocp.args.JsonSave(meta)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state, data_iter=None):
        """Restores the state into the shardings of `abstract_state` (ShapeDtypeStructs) and moves
        `data_iter` (if given) to where it was at `step`."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self.manager.restore(step, args=ocp.args.Composite(**items)).state

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
