"""`python -m tau2jax.train`: config errors by name, resume after SIGKILL, tiny SFT learns."""

import json
import os
import signal
import time

import pytest

from cli_runs import one_line_error, run_train, start_train, train


@pytest.mark.parametrize("override, expected", [
    ("--config.optim.lrr=0.1", "lrr"),
    ("--config.train.steps=abc", "train.steps"),
    ("--config.data.train_files=/nonexistent/sft.jsonl", "/nonexistent/sft.jsonl"),
    ("--config.tau2.prompt_style=fancy", "tau2.prompt_style"),
    ("--config.optim.grad_accum=3", "optim.grad_accum"),
    ("--config.train.loss_chunk=100", "train.loss_chunk"),
    ("--config.model.attn_chunk=300", "model.attn_chunk"),
    ("--config.model.attn_impl=cuda", "model.attn_impl"),
    ("--config.model.attn_max_segments=0", "model.attn_max_segments"),
])
def test_bad_config_is_rejected_by_name(override, expected, tmp_path):
    proc = run_train("--config", "configs/tiny_sft.py", f"--config.workdir={tmp_path}", override, check=False, timeout=300)
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr or expected in proc.stderr.splitlines()[-1]


@pytest.mark.parametrize("args, expected", [
    (["--config.train.lr_typo=1"], "error: config.train.lr_typo: no such config key; did you mean --config."),
    (["--config.optim.lrr=0.1"], "error: config.optim.lrr: no such config key; did you mean --config.optim.lr?"),
    (["--config.model.name=qwen3_9b"], "error: config.model.name: unknown model size 'qwen3_9b'"),
    (["--config.train.steps=-5"], "error: config.train.steps: -5 is negative"),
    (["--config.model.name=qwen3_0_6b"], "error: config.model.init_from: not set, so model.name='qwen3_0_6b' "
                                         "would train from random weights"),
])
def test_config_mistakes_get_one_line_and_write_nothing(args, expected, tmp_path):
    workdir = tmp_path / "run"
    proc = run_train("--config", "configs/tiny_sft.py", f"--config.workdir={workdir}", *args, check=False, timeout=300)
    assert one_line_error(proc).startswith(expected)
    assert not workdir.exists()


def test_a_missing_config_file_gets_one_line(tmp_path):
    proc = run_train("--config", str(tmp_path / "nope.py"), check=False, timeout=120)
    assert one_line_error(proc).startswith(f"error: --config {tmp_path / 'nope.py'}: no such config file")


def test_model_hf_dir_without_init_from_is_not_a_silent_random_init(tmp_path):
    """The 4B SFT config given only model.hf_dir trained from random weights (first loss 11.94)."""
    hf, workdir = tmp_path / "hf", tmp_path / "run"
    hf.mkdir()
    proc = run_train("--config", "configs/qwen3_4b_sft.py", f"--config.model.hf_dir={hf}",
                     f"--config.workdir={workdir}", check=False, timeout=300)
    line = one_line_error(proc)
    assert line.startswith("error: config.model.init_from: not set, so model.hf_dir's model") and "random_init=True" in line
    assert not workdir.exists()


@pytest.mark.parametrize("domain", ["mock", "airline"])
def test_an_unknown_split_is_refused_for_every_domain(domain, tmp_path):
    workdir = tmp_path / "run"
    proc = run_train("--config", "configs/eval.py", f"--config.tau2.domains={domain}", "--config.tau2.split=tset",
                     f"--config.workdir={workdir}", check=False, timeout=300)
    assert one_line_error(proc).startswith(f"error: config.tau2.split: {domain} has no split 'tset'; use one of [")
    assert not workdir.exists()


def test_an_empty_data_file_is_named_as_empty(tmp_path):
    empty, workdir = tmp_path / "empty.jsonl", tmp_path / "run"
    empty.write_text("")
    proc = run_train("--config", "configs/tiny_sft.py", f"--config.data.train_files={empty}",
                     f"--config.workdir={workdir}", check=False, timeout=300)
    assert one_line_error(proc).startswith(f"error: {empty}: the SFT data file is empty")
    assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()


def _losses(workdir) -> dict[int, float]:
    """Last logged loss per step (a resumed run re-logs the steps after its checkpoint)."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            d = json.loads(line)
            out[d["step"]] = d["loss"]
    return out


def test_sigkill_then_rerun_resumes_with_identical_losses(tmp_path, short_sft_jsonl):
    data = short_sft_jsonl
    common = ["--config", "configs/tiny_sft.py", f"--config.data.train_files={data}",
              "--config.data.max_len=64", "--config.data.batch_size=2", "--config.train.steps=40",
              "--config.train.checkpoint_every=4", "--config.train.loss_chunk=64", "--config.optim.lr=1e-3"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    run_train(*common, f"--config.workdir={ref_dir}")
    reference = _losses(ref_dir)
    assert sorted(reference) == list(range(1, 41))

    proc = start_train(*common, f"--config.workdir={run_dir}")
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 600
    # Kill once a checkpoint is committed and training has gone past it.
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and (run_dir / "checkpoints" / "8").exists() and len(metrics.read_text().splitlines()) >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "training finished before it could be killed"
    killed_at = max(_losses(run_dir))
    assert killed_at < 40

    resumed_from = train(*common, f"--config.workdir={run_dir}")["resumed_from"]
    assert 4 <= resumed_from <= killed_at
    resumed = _losses(run_dir)
    assert sorted(resumed) == list(range(1, 41))
    for step in range(resumed_from + 1, 41):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step


@pytest.mark.slow
def test_tiny_sft_config_halves_the_loss(tmp_path):
    result = train("--config", "configs/tiny_sft.py", f"--config.workdir={tmp_path}")
    assert result["stage"] == "sft" and result["steps"] == 15
    assert result["final_loss"] <= 0.5 * result["first_loss"]
    assert result["loss_halved"] is True
    assert os.path.isdir(result["checkpoint"])
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))


def _params_digest(path) -> str:
    import hashlib

    import jax
    import numpy as np

    from tau2jax.weights.orbax_params import restore_params

    params, _ = restore_params(path)
    return hashlib.sha1(b"".join(np.asarray(x).tobytes() for x in jax.tree.leaves(params))).hexdigest()


def test_continued_run_exports_its_new_final_step(tmp_path, short_sft_jsonl):
    """A finished run continued to more steps in the same workdir exports the new weights (the
    first wave kept the first export), records the step, and leaves one export directory."""
    common = ["--config", "configs/tiny_sft.py", f"--config.data.train_files={short_sft_jsonl}",
              "--config.data.max_len=64", "--config.data.batch_size=2", "--config.optim.lr=1e-3",
              "--config.optim.schedule=constant",  # a cosine run may not change its length on resume
              f"--config.workdir={tmp_path}"]
    first = train(*common, "--config.train.steps=3")
    assert first["params_step"] == 3
    digest3 = _params_digest(first["params"])
    second = train(*common, "--config.train.steps=6")
    assert second["params_step"] == 6 and second["resumed_from"] == 3
    assert _params_digest(second["params"]) != digest3
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("params")) == ["params", "params-step6"]


def test_cudnn_rows_with_more_segments_than_allowed_are_refused_by_name(tmp_path, short_sft_jsonl):
    """attn_impl=cudnn sees at most attn_max_segments runs a row: a packed batch with more is
    refused before the step (on any backend), naming the field to raise."""
    proc = run_train("--config", "configs/tiny_sft.py", f"--config.data.train_files={short_sft_jsonl}",
                  "--config.data.max_len=64", "--config.data.batch_size=2", "--config.train.steps=2",
                  "--config.model.attn_impl=cudnn", "--config.model.attn_max_segments=1",
                  f"--config.workdir={tmp_path}", check=False, timeout=300)
    assert proc.returncode != 0
    assert "config.model.attn_max_segments=1, but a packed row holds" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_trained_policy_exports_as_a_servable_hf_dir(tmp_path, short_sft_jsonl):
    """SGLang launches from a directory with weights, config and tokenizer (+ chat template): the
    training export carries the tokenizer files the run used, and orbax_to_hf writes them out."""
    from checkpoints_tools import orbax_to_hf
    from tau2jax.data.tokenizer import load_tokenizer
    from tau2jax.weights.hf_read import load_hf_params

    run = train("--config", "configs/tiny_sft.py", f"--config.data.train_files={short_sft_jsonl}",
                "--config.data.max_len=64", "--config.train.steps=1", f"--config.workdir={tmp_path / 'run'}")
    out = tmp_path / "hf"
    assert orbax_to_hf.main(["--orbax-dir", run["params"], "--out", str(out), "--dtype", "bfloat16"]) == 0
    files = set(os.listdir(out))
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"} <= files
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    assert load_tokenizer(str(out)).vocab_size == load_tokenizer().vocab_size
    load_hf_params(str(out))  # the weights read back under the written config
