"""launch/rehearsal.py's tally reads only the run's own files: finished steps, pushes, aborts, and
GRPO episodes the rollout dump holds but the ledger does not."""

import importlib.util
import json
import os

from tau2jax.stages import pipeline

_spec = importlib.util.spec_from_file_location(
    "rehearsal", os.path.join(os.path.dirname(__file__), "..", "launch", "rehearsal.py"))
rehearsal = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rehearsal)


def _write(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_tally_counts_steps_pushes_aborts_and_unledgered_episodes(tmp_path):
    run = str(tmp_path)
    for step in ("demos", "eval_base", "sft"):
        _write(os.path.join(run, step, pipeline.DONE), [{"result": {}}])
    grpo = os.path.join(run, "grpo")
    _write(os.path.join(grpo, "metrics.jsonl"), [{"step": 1, "loss": 0.1, "weight_sync_pause_s": 0.2},
                                                 {"step": 2, "loss": 0.1}])
    ep = lambda i, err=None: {"domain": "airline", "task_id": "0", "sample_index": i, "infra_error": err}  # noqa: E731
    _write(os.path.join(grpo, "rollouts", "step_1.jsonl"),
           [ep(0), ep(1, "engine: generation aborted (weight version mismatch)"), ep(1)])
    _write(os.path.join(grpo, "rollouts", "ledger.jsonl"),
           [{"step": 1, "task": "airline/0", "sample_index": i} for i in (0, 1)])
    out = rehearsal.summary(run, 12.0)
    assert out["steps_done"] == ["demos", "eval_base", "sft"]
    assert out["weight_pushes"] == 2  # one step pushed, plus the push of the starting weights
    assert out["turns_aborted_by_push"] == 1
    assert out["episodes_unaccounted"] == 1 and out["episodes_dumped"] == 3  # the retried attempt has no line
    assert out["wall_s"] == 12.0
