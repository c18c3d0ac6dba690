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


def test_tally_reads_restarts_updates_replicas_and_turns_stamped_against_the_request_log(tmp_path):
    from tau2jax.inference.server import token_digest

    run, logs = str(tmp_path / "run"), str(tmp_path / "logs")
    grpo = os.path.join(run, "grpo")
    _write(os.path.join(grpo, "metrics.jsonl"), [{"step": 1, "loss": 0.1}, {"step": 2, "loss": 0.1}])
    _write(os.path.join(grpo, pipeline.DONE), [{"result": {"optimizer_updates": 2},
                                               "config": {"rl": {"rollout": {"concurrency": 4}}}}])
    # one episode, two sampled turns: the first served by version 1, the second by 2 but stamped 1
    ids = [5, 6, 7, 8, 9, 10]
    turns = [{"start": 2, "end": 3, "policy_version": 1}, {"start": 4, "end": 6, "policy_version": 1}]
    _write(os.path.join(grpo, "rollouts", "step_1.jsonl"),
           [{"domain": "airline", "task_id": "0", "sample_index": 0, "infra_error": None, "token_ids": ids,
             "turns": turns}])
    served = lambda t, v, n: {"endpoint": "/generate", "weight_version": v, "in_flight": n,  # noqa: E731
                              "prompt": token_digest(ids[:t["start"]]), "output": token_digest(ids[t["start"]:t["end"]])}
    _write(os.path.join(logs, "policy-requests.jsonl"),
           [served(turns[0], "1", 3), served(turns[1], "2", 4), {"endpoint": "/v1/chat/completions", "in_flight": 9}])
    with open(os.path.join(logs, "restarts.log"), "w") as f:
        f.write("1700000000 policy 1 137\n1700000001 user 1 1\n")
    with open(os.path.join(logs, "policy.log"), "w") as f:  # the last start counts
        f.write("sglang stand-in: dp_size=3 replicas=1\nrestarted\nsglang stand-in: dp_size=3 replicas=3\n")
    out = rehearsal.summary(run, 1.0, logs)
    assert out["grpo_steps"] == 2 and out["grpo_optimizer_updates"] == 2 and out["rollout_concurrency"] == 4
    assert out["turns_stamped_wrong"] == 1  # the second turn: served by 2, recorded as 1
    assert out["max_requests_in_flight"] == 4  # policy turns only
    assert out["policy_restarts"] == 1  # the user server's restart is not the policy's
    assert out["policy_dp_size"] == 3 and out["policy_replicas"] == 3
