"""Elastic resume, in-process (8 fake CPU devices): the data position is a function of the step
alone, and a checkpoint restores onto a mesh of another size. The end-to-end run (2 processes
checkpoint, 1 process resumes) is in test_multihost.py."""

import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tau2jax.data.pipeline import make_sft_dataset
from tau2jax.data.sft_data import DataError
from tau2jax.data.tokenizer import load_tokenizer
from tau2jax.learn.checkpoint import Checkpointer, abstract_like
from tau2jax.parallel import sharding

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "data", "tiny_sft.jsonl")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _dataset(tok, process_index=0, process_count=1):
    return make_sft_dataset([FIXTURE], tok, max_len=1536, batch_size=4, seed=3, num_epochs=4, shuffle=True,
                            process_index=process_index, process_count=process_count)


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_iterator_at_a_step_matches_the_uninterrupted_stream_for_any_process_count(tok):
    full = list(_dataset(tok))
    assert len(full) >= 6
    start = 4
    tail = list(_dataset(tok).iterator(start))
    assert len(tail) == len(full) - start and all(map(_same, tail, full[start:]))
    # Two processes positioned at the same step hold the two halves of the same global batches.
    halves = [list(_dataset(tok, p, 2).iterator(start)) for p in range(2)]
    for i, (a, b) in enumerate(zip(*halves)):
        assert _same({k: np.concatenate([a[k], b[k]]) for k in a}, full[start + i])


def test_iterator_past_the_end_of_the_data_says_what_changed(tok):
    n = sum(1 for _ in _dataset(tok))
    assert list(_dataset(tok).iterator(n)) == []
    with pytest.raises(DataError, match=rf"data ends after {n} batches, before batch {n + 1}.*data\.\*"):
        _dataset(tok).iterator(n + 1)


def _state(mesh):
    """A train-state-like pytree sharded over `mesh` (rows over data × fsdp, columns over tensor)."""
    w = NamedSharding(mesh, P(("data", "fsdp"), "tensor"))
    rep = NamedSharding(mesh, P())
    tree = {"params": np.arange(8 * 6, dtype=np.float32).reshape(8, 6), "step": np.int32(3)}
    return jax.device_put(tree, {"params": w, "step": rep}), {"params": w, "step": rep}


@pytest.mark.parametrize("n_devices, axes", [(2, (1, 2, 1)), (1, (1, 1, 1))])
def test_checkpoint_restores_onto_a_mesh_of_another_size(tmp_path, n_devices, axes):
    saved, _ = _state(sharding.make_mesh(2, 2, 2))  # 8 devices
    ckpt = Checkpointer(str(tmp_path), save_every=1, keep=1, async_save=False)
    ckpt.save(3, saved)
    ckpt.close()

    small = sharding.make_mesh(*axes, devices=jax.devices()[:n_devices])
    target, shardings = _state(small)
    restored = Checkpointer(str(tmp_path), save_every=1, keep=1).restore(3, abstract_like(target, shardings))
    assert restored["params"].sharding == shardings["params"]
    assert len(restored["params"].sharding.device_set) == n_devices
    np.testing.assert_array_equal(jax.device_get(restored["params"]), jax.device_get(saved["params"]))
    assert int(restored["step"]) == 3


def test_checkpoint_with_an_old_per_process_data_item_still_restores(tmp_path, tok):
    """Checkpoints written before elastic resume also hold the grain iterator ("data"): ignored."""
    mesh = sharding.make_mesh(2, 2, 2)
    saved, shardings = _state(mesh)
    it = iter(_dataset(tok))
    next(it)
    ckpt = Checkpointer(str(tmp_path), save_every=1, keep=1, async_save=False)
    ckpt.manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(saved),
                                                 data=grain.checkpoint.CheckpointSave(it)))
    ckpt.close()
    assert os.path.isdir(tmp_path / "1" / "data")

    ckpt = Checkpointer(str(tmp_path), save_every=1, keep=1)
    restored = ckpt.restore(ckpt.latest_step(), abstract_like(saved, shardings))
    np.testing.assert_array_equal(jax.device_get(restored["params"]), jax.device_get(saved["params"]))
