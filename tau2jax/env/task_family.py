"""A generated tau2 task family with a train/test split, on the mock domain's tools: a tau2 data dir
(`tau2.data_dir`) where RL can be scored on tasks it never trained on.

    python -m tau2jax.env.task_family OUT_DIR      # writes OUT_DIR/tau2/domains/mock/

Every task is one call, `update_task_status(task_id="task_K", status=S)`, K in 1..NUM_TASKS (the
digit is one Qwen3 token), S in STATUSES (one token each); the task starts from the other status
(`initial_state.initialization_data`), so a do-nothing agent fails every task, and tau2's default
reward basis (DB + communicate, no communicate_info) scores the call. The scripted user states
both slots in its opening ("Request that task_3 be marked as completed.").

The split holds out combinations: test = (K, S) for K in 1..NUM_HELD_OUT with S the status K's
parity picks, train = every other pair. So every digit and every status is trained, each held-out
pair only in the other combination (K = 1..NUM_HELD_OUT are trained with one status, the rest with
both). `split_tasks.json`: "train", "test", "base" (all). The db holds task_1..task_NUM_TASKS
and user_1; policy files are the wheel's mock ones.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import tau2

# The wheel's own mock files (not tau2's DATA_DIR, which init_tau2 may point at a generated dir).
WHEEL_MOCK = Path(tau2.__file__).parent / "data" / "tau2" / "domains" / "mock"

DOMAIN = "mock"
NUM_TASKS = 9  # task_1 .. task_9: single-digit ids
NUM_HELD_OUT = 6
STATUSES = ("pending", "completed")


def task_id(k: int, status: str) -> str:
    return f"set_task_{k}_{status}"


def held_out(k: int, status: str) -> bool:
    return k <= NUM_HELD_OUT and status == STATUSES[k % 2]


def split() -> dict[str, list[str]]:
    """{"train", "test", "base"} -> task ids (disjoint train / test, asserted)."""
    pairs = [(k, s) for k in range(1, NUM_TASKS + 1) for s in STATUSES]
    test = [task_id(k, s) for k, s in pairs if held_out(k, s)]
    train = [task_id(k, s) for k, s in pairs if not held_out(k, s)]
    assert test and not set(train) & set(test)
    return {"train": train, "test": test, "base": train + test}


def _db_task(k: int, status: str) -> dict:
    return {"task_id": f"task_{k}", "title": f"Task {k}", "description": f"Generated task {k}", "status": status}


def make_task(k: int, status: str) -> dict:
    """One tau2 task (tasks.json entry)."""
    other = STATUSES[1 - STATUSES.index(status)]
    return {
        "id": task_id(k, status),
        "description": {"purpose": "Held-out RL: update_task_status with generated slot values",
                        "notes": f"split {'test' if held_out(k, status) else 'train'}"},
        "user_scenario": {"persona": "Direct and brief",
                          "instructions": f"Request that task_{k} be marked as {status}."},
        "ticket": f"User needs to update the status of task_{k} to {status}.",
        "initial_state": {"initialization_data": {"agent_data": {"tasks": {f"task_{k}": _db_task(k, other)}}}},
        "evaluation_criteria": {
            "actions": [{"action_id": "update_1", "name": "update_task_status",
                         "arguments": {"task_id": f"task_{k}", "status": status}, "info": "Update the task status"}],
        },
    }


def write_data_dir(out: str | Path) -> Path:
    """Writes the family under `out`/tau2/domains/mock/ and returns `out` (a `tau2.data_dir`).
    Deterministic: the same files every time."""
    root = Path(out)
    d = root / "tau2" / "domains" / DOMAIN
    d.mkdir(parents=True, exist_ok=True)
    for name in ("policy.md", "policy_solo.md"):
        shutil.copyfile(WHEEL_MOCK / name, d / name)
    db = {"tasks": {f"task_{k}": _db_task(k, "pending") for k in range(1, NUM_TASKS + 1)},
          "users": {"user_1": {"user_id": "user_1", "name": "Test User",
                               "tasks": [f"task_{k}" for k in range(1, NUM_TASKS + 1)]}}}
    tasks = [make_task(k, s) for k in range(1, NUM_TASKS + 1) for s in STATUSES]
    for name, obj in (("db.json", db), ("tasks.json", tasks), ("split_tasks.json", split())):
        (d / name).write_text(json.dumps(obj, indent=1) + "\n")
    return root


if __name__ == "__main__":
    print(write_data_dir(sys.argv[1]))
