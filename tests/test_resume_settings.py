"""A resumed SFT or GRPO run keeps the settings its checkpoints were trained with: another learning
rate, data, loss or step count is refused by name in one line (exit 2), before anything in the
workdir moves; an extension of a constant schedule, or of a finished run, is allowed and said."""

import hashlib
import os

import pytest
from cli_runs import one_line_error, run_train, short_sft, summary

from tau2jax import config as config_lib
from tau2jax.stages import resume


def _tree_digest(workdir) -> str:
    """Every file under the workdir, path and bytes: a refused resume changes none of them."""
    h = hashlib.sha1()
    for root, dirs, files in sorted(os.walk(workdir)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            h.update(os.path.relpath(path, workdir).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def _sft(workdir, data, *extra, check=True):
    return short_sft(workdir, data, "--config.optim.lr=1e-3", *extra, check=check)


def test_sft_resume_refuses_changed_settings_by_name_and_moves_nothing(tmp_path, short_sft_jsonl):
    workdir = tmp_path / "run"
    _sft(workdir, short_sft_jsonl, "--config.train.steps=2")
    before = _tree_digest(workdir)

    line = one_line_error(_sft(workdir, short_sft_jsonl, "--config.train.steps=2", "--config.optim.lr=0.5",
                                "--config.data.max_len=96", check=False))
    assert line.startswith(f"error: config: workdir '{workdir}' holds a sft run with other settings (")
    assert "optim.lr: 0.001 -> 0.5" in line and "data.max_len: 64 -> 96" in line
    assert "use a new config.workdir, or the earlier values to resume" in line

    # a finished run may not shrink
    line = one_line_error(_sft(workdir, short_sft_jsonl, "--config.train.steps=1", check=False))
    assert line.startswith(f"error: config.train.steps: workdir '{workdir}' holds a sft run of 2 steps at step 2, "
                           "this one asks for 1; a cosine schedule decays")
    assert _tree_digest(workdir) == before

    # ... but may train longer (tiny_sft's cosine): said, and the new final weights exported
    proc = _sft(workdir, short_sft_jsonl, "--config.train.steps=4")
    assert ("note: steps 2 -> 4: the run had finished at step 2; steps 3-4 follow the cosine schedule of a "
            "4-step run (lr 0.0005 at step 3)") in proc.stderr
    out = summary(proc)
    assert (out["steps"], out["params_step"], out["resumed_from"]) == (4, 4, 2)


def test_a_cosine_run_refuses_another_step_count_mid_run(tmp_path):
    # Mid-run, the decay over the whole run would change every learning rate after the checkpoint.
    c = config_lib.default_config()
    c.stage, c.optim.schedule = "sft", "cosine"
    resume.record_train_settings(str(tmp_path), resume.train_settings(c, 4))
    with pytest.raises(config_lib.ConfigError, match="holds a sft run of 4 steps at step 2, this one asks for 6"):
        resume.check_train_resume(str(tmp_path), c, resume.train_settings(c, 6), 2)
    assert resume.check_train_resume(str(tmp_path), c, resume.train_settings(c, 4), 2) == []


def _toy_grpo(workdir, *extra, check=True):
    return run_train("--config", "configs/tiny_grpo_toy.py", "--config.rl.tasks_per_step=2",
                     "--config.rl.samples_per_task=4", "--config.train.checkpoint_every=1",
                     f"--config.workdir={workdir}", *extra, check=check, timeout=600)


def test_grpo_resume_refuses_a_changed_loss_and_allows_a_constant_schedule_extension(tmp_path):
    workdir = tmp_path / "grpo"
    first = summary(_toy_grpo(workdir, "--config.rl.steps=1"))
    assert first["steps"] == 1
    before = _tree_digest(workdir)

    line = one_line_error(_toy_grpo(workdir, "--config.rl.steps=1", "--config.rl.loss.eps_high=0.4",
                                     "--config.rl.samples_per_task=8", check=False))
    assert line.startswith(f"error: config: workdir '{workdir}' holds a grpo run with other settings (")
    assert "rl.samples_per_task: 4 -> 8" in line and "rl.loss.eps_high: 0.28 -> 0.4" in line
    assert _tree_digest(workdir) == before

    # tiny_grpo_toy's constant learning rate without warmup: two more steps change no step's lr
    proc = _toy_grpo(workdir, "--config.rl.steps=2")
    assert "note: steps 1 -> 2: the constant learning rate after step 1 is unchanged" in proc.stderr
    assert "resuming from step 1 of 2" in proc.stderr
    assert summary(proc)["steps"] == 2
