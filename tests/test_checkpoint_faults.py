"""Broken checkpoints get one line naming the file (or the parameter), and a resume falls back to
the previous good step: corrupt, truncated or uncommitted init weights, non-finite weights, a
corrupt latest train-state step, a model whose shapes changed since the save."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli_runs import run_train, short_sft, summary
from tau2jax.config import ConfigError
from tau2jax.learn.checkpoint import Checkpointer
from tau2jax.weights.orbax_params import CheckpointFormatError, check_finite, restore_params, save_params


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1] and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def orbax_dir(tmp_path_factory):
    """A converted tiny Qwen3 with the real tokenizer's vocabulary (what tiny_sft trains)."""
    from tau2jax.weights.convert import convert
    from tau2jax.models.tiny_hf import make_tiny_hf_dir
    from tau2jax.data.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("ckpt")
    make_tiny_hf_dir(str(root / "hf"), vocab_size=load_tokenizer().vocab_size, seed=0)
    convert(str(root / "hf"), str(root / "orbax"))
    return root / "orbax"


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _largest_data_file(params_dir):
    files = [os.path.join(r, f) for r, _, fs in os.walk(params_dir) for f in fs if os.sep + "d" + os.sep in
             os.path.join(r, f)]
    return max(files, key=os.path.getsize)


def _truncate(ckpt):
    path = _largest_data_file(ckpt / "params")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _corrupt_metadata(ckpt):
    (ckpt / "params" / "_METADATA").write_text("{not json")


def _uncommit(ckpt):
    os.remove(ckpt / "params" / "commit_success.txt")


@pytest.mark.parametrize("breakage, names", [
    (_truncate, "params: reading the weights failed"),
    (_corrupt_metadata, "params/_METADATA: unreadable"),
    (_uncommit, "params/commit_success.txt: missing, so the save of the checkpoint never committed"),
])
def test_a_broken_init_checkpoint_is_named(orbax_dir, tmp_path, breakage, names):
    ckpt = _copy(orbax_dir, tmp_path / "orbax")
    breakage(ckpt)
    with pytest.raises(CheckpointFormatError, match=names):
        restore_params(str(ckpt))


def _nan_checkpoint(orbax_dir, out):
    params, cfg = restore_params(str(orbax_dir))
    params = jax.tree.map(np.asarray, params)
    params["layers"]["q_proj"] = params["layers"]["q_proj"].copy()
    params["layers"]["q_proj"].flat[7] = np.nan
    save_params(str(out), params, cfg)
    shutil.copytree(orbax_dir / "hf_extra", out / "hf_extra")
    return out


def test_non_finite_init_weights_name_the_first_bad_leaf(orbax_dir, tmp_path):
    params, _ = restore_params(str(_nan_checkpoint(orbax_dir, tmp_path / "nan")))
    with pytest.raises(CheckpointFormatError, match=r"parameter layers/q_proj holds NaN or inf"):
        check_finite(params, "weights")


@pytest.mark.parametrize("breakage", ["truncate", "uncommit", "nan"])
def test_sft_from_broken_init_weights_fails_before_step_1_in_one_line(orbax_dir, tmp_path, short_sft_jsonl, breakage):
    """Was: a 150-line traceback, `'NoneType' object has no attribute 'tree'`, or 'non-finite loss at
    step 1 ... lower optim.lr'."""
    if breakage == "nan":
        ckpt = _nan_checkpoint(orbax_dir, tmp_path / "orbax")
    else:
        ckpt = _copy(orbax_dir, tmp_path / "orbax")
        {"truncate": _truncate, "uncommit": _uncommit}[breakage](ckpt)
    workdir = tmp_path / "run"
    proc = run_train("--config", "configs/tiny_sft.py", f"--config.data.train_files={short_sft_jsonl}",
                     "--config.data.max_len=64", "--config.train.steps=2", f"--config.model.init_from={ckpt}",
                     f"--config.workdir={workdir}", check=False, timeout=300)
    line = _one_line_error(proc)
    assert str(ckpt) in line
    assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()


def _sft(workdir, data, *extra, check=True):
    return short_sft(workdir, data, "--config.train.steps=4", *extra, check=check)


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_step(tmp_path, short_sft_jsonl):
    workdir = tmp_path / "run"
    _sft(workdir, short_sft_jsonl)  # saves steps 2 and 4
    ckpts = workdir / "checkpoints"
    assert {"2", "4"} <= set(os.listdir(ckpts))
    path = _largest_data_file(ckpts / "4" / "state")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    refused = _sft(workdir, short_sft_jsonl, "--config.optim.lr=0.5", check=False)  # settings first: nothing moved
    assert _one_line_error(refused).startswith("error: config: workdir")
    assert not any(".bad-" in n for n in os.listdir(ckpts))
    proc = _sft(workdir, short_sft_jsonl, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [l for l in proc.stderr.splitlines() if l.startswith("warning: ")]
    assert len(warnings) == 1, proc.stderr[-3000:]
    assert f"checkpoint step 4 in {ckpts} does not read back" in warnings[0]
    assert "resuming from step 2, the newest good one" in warnings[0]
    assert "resuming from step 2 of 4" in proc.stderr
    assert summary(proc)["resumed_from"] == 2
    assert any(n.startswith("4.bad-") for n in os.listdir(ckpts))  # kept, not deleted
    assert (ckpts / "4").is_dir()  # saved again


def test_a_changed_model_shape_on_resume_names_the_parameter_and_both_shapes(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=1, keep=2, async_save=False)
    ckpt.save(1, {"params": {"embed": jnp.zeros((8, 4))}}, force=True)
    ckpt.close()
    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=1, keep=2, async_save=False)
    target = {"params": {"embed": jax.ShapeDtypeStruct((8, 6), jnp.float32)}}
    with pytest.raises(ConfigError, match=r"checkpoint step 1 .* has params/embed of shape \(8, 4\), "
                                          r"this config's model has \(8, 6\)"):
        ckpt.restore_latest(target)
    assert os.listdir(tmp_path / "ckpt") == ["1"]  # a config mismatch sets nothing aside


def test_no_readable_checkpoint_is_one_error_naming_the_newest(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=1, keep=2, async_save=False)
    ckpt.save(1, {"w": jnp.ones(3)}, force=True)
    ckpt.close()
    os.remove(tmp_path / "ckpt" / "1" / "commit_success.txt")
    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=1, keep=2, async_save=False)
    with pytest.raises(CheckpointFormatError, match=r"1/commit_success.txt: missing.*no other checkpoint"):
        ckpt.restore_latest({"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
    assert json.dumps(os.listdir(tmp_path / "ckpt")) == '["1"]'
