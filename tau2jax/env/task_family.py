"""A generated tau2 task family with a train/test split, on the mock domain's tools: a tau2 data dir
(`tau2.data_dir`) where RL can be scored on tasks it never trained on.

    python -m tau2jax.env.task_family OUT_DIR      # writes OUT_DIR/tau2/domains/mock/

Every task is one call, `create_task(user_id=U, title=T)`, U in USERS, T in TITLES: words that are
one Qwen3 token both in the user's text (quoted) and in the call's JSON, and that appear nowhere
in the mock policy or tool schemas, so an agent finds each slot by what it is, not where it is (a
first try with `update_task_status(task_K, status)` failed: digits and statuses also sit in the
system prompt, and the `tiny` model's SFT answered one constant call for every task). tau2's
default reward basis (DB + communicate, no communicate_info) scores the call: a do-nothing agent
fails every task. The scripted user states both slots in its opening, in the call's argument order
(user, then title), and the agent sees CREATE_TASK_SCHEMA (no pydantic "title" keys). The `tiny`
model's SFT (lr 1e-2, cosine, seed 0), greedy pass@1 on train / test tasks: title-first with
tau2's schema 0.2 / 0.2 after 300 steps; without the keys 0.1 / 0.2; in call order 0.05 / 0 after
150 steps; both 0.45 / 0.2 after 150 and 1.0 / 1.0 after 300 (WORKSPACE).

The split holds out combinations: test = (USERS[i], TITLES[i]) (a diagonal), train = every other
pair, so every user and every title is trained, each held-out pair never. `split_tasks.json`:
"train", "test", "base" (all). The db holds the users and no tasks; policy files are the wheel's.
The agent's prompt shows only `create_task` (`agent_tools.json`, see tau2_env.AGENT_TOOLS_FILE):
with mock's 440 tokens of tool schemas the two slot words were 2 of ~780 prompt tokens and the
`tiny` model never learnt to copy them (slot NLL stuck at ln 5 after 500 SFT steps); with no
schema at all (a 264-token prompt) it copied them, held-out pairs included, within 150 steps
(teacher-forced; WORKSPACE has the runs). CREATE_TASK_SCHEMA is 119 tokens.
"""

import json
import shutil
import sys
from pathlib import Path

import tau2

from tau2jax.env import tau2_env

# The wheel's own mock files (not tau2's DATA_DIR, which init_tau2 may point at a generated dir).
WHEEL_MOCK = Path(tau2.__file__).parent / "data" / "tau2" / "domains" / "mock"

DOMAIN = "mock"
USERS = ("ava", "ben", "dan", "eve", "tom")
TITLES = ("apple", "bread", "cake", "rice", "soup")

# create_task's schema as tau2 writes it, less pydantic's "title" keys ("title": "User Id", "Title",
# "parameters"): they repeat the call's own `"title": "` context, a copy target beside the user's
# title word (the module docstring has the runs).
CREATE_TASK_SCHEMA = {"type": "function", "function": {
    "name": "create_task", "description": "Create a new task for a user.",
    "parameters": {"properties": {"user_id": {"description": "The ID of the user creating the task", "type": "string"},
                                  "title": {"description": "The title of the task", "type": "string"},
                                  "description": {"default": None, "description": "Optional description of the task",
                                                  "type": "string"}},
                   "required": ["user_id", "title"], "type": "object"}}}


def task_id(user: str, title: str) -> str:
    return f"create_{title}_for_{user}"


def held_out(user: str, title: str) -> bool:
    return USERS.index(user) == TITLES.index(title)


def split() -> dict[str, list[str]]:
    """{"train", "test", "base"} -> task ids (disjoint train / test, asserted)."""
    pairs = [(u, t) for u in USERS for t in TITLES]
    test = [task_id(u, t) for u, t in pairs if held_out(u, t)]
    train = [task_id(u, t) for u, t in pairs if not held_out(u, t)]
    assert test and not set(train) & set(test)
    return {"train": train, "test": test, "base": train + test}


def make_task(user: str, title: str) -> dict:
    """One tau2 task (tasks.json entry)."""
    return {
        "id": task_id(user, title),
        "description": {"purpose": "Held-out RL: create_task with generated slot values",
                        "notes": f"split {'test' if held_out(user, title) else 'train'}"},
        "user_scenario": {"persona": "Direct and brief",
                          "instructions": f'Create a task for user "{user}" titled "{title}".'},
        "ticket": f'User needs a new task for user "{user}" titled "{title}".',
        "evaluation_criteria": {
            "actions": [{"action_id": "create_1", "name": "create_task",
                         "arguments": {"user_id": user, "title": title}, "info": "Create the task"}],
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
    db = {"tasks": {}, "users": {u: {"user_id": u, "name": u.capitalize(), "tasks": []} for u in USERS}}
    tasks = [make_task(u, t) for u in USERS for t in TITLES]
    for name, obj in (("db.json", db), ("tasks.json", tasks), ("split_tasks.json", split()),
                      (tau2_env.AGENT_TOOLS_FILE, [CREATE_TASK_SCHEMA])):
        (d / name).write_text(json.dumps(obj, indent=1) + "\n")
    return root


if __name__ == "__main__":
    print(write_data_dir(sys.argv[1]))
