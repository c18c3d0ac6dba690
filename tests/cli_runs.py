"""`python -m tau2jax.train` as a subprocess, the way a user runs it on a laptop: one CPU device
(the 8 fake devices the in-process tests use are dropped), the repo root as working directory."""

import json
import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAPTOP_ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def train_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "tau2jax.train", *args]


def run_train(*args, check=True, timeout=900) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=LAPTOP_ENV)
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def summary(proc: subprocess.CompletedProcess) -> dict:
    """The run's summary: its last stdout line, one JSON object."""
    return json.loads(proc.stdout.strip().splitlines()[-1])


def train(*args, timeout=900) -> dict:
    """Run to completion (asserting success) -> the summary."""
    return summary(run_train(*args, timeout=timeout))


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The CLI's answer to bad input: exit 2, one stderr line `error: ...`, no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def short_sft(workdir, data, *extra, check=True) -> subprocess.CompletedProcess:
    """configs/tiny_sft.py on a short data file, a checkpoint every 2 steps, saved synchronously."""
    return run_train("--config", "configs/tiny_sft.py", f"--config.data.train_files={data}",
                     "--config.data.max_len=64", "--config.data.batch_size=2", "--config.train.checkpoint_every=2",
                     "--config.train.async_checkpoint=False", f"--config.workdir={workdir}", *extra, check=check,
                     timeout=600)


def start_train(*args) -> subprocess.Popen:
    """A run in the background, output discarded (the SIGKILL-resume tests kill it)."""
    return subprocess.Popen(train_cmd(*args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=LAPTOP_ENV)


def run_group(cmd, env, timeout) -> subprocess.CompletedProcess:
    """Runs `cmd` (a launcher and its trainers) in its own process group from the repo root; on
    timeout the whole group is killed (SIGKILL: jax.distributed catches SIGTERM)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{cmd[:4]} timed out after {timeout}s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
