"""Stage "demos": gold demonstrations of the train tasks, as SFT JSONL.

Each train task's expected actions are played through the full episode path (prompt style, chat
format, tool-call parsing, the real tau2 environment, the scripted user, tau2's evaluator) by the
GoldEngine, `eval.concurrency` at a time (`rl.collector.play`). Every conversation that scores 1.0 is written to `{workdir}/{domain}.jsonl` as
{"messages": [...], "tools": [...]} in the configured prompt style, with the real tool outputs.
Test-split tasks are refused: demonstrations of them would leak the benchmark into training.

tau2's Results files of every replay go to `{workdir}/trajectories/<domain>.json`
(`tau2jax.eval.tau2_results`). Returns {domain: {"replayed", "reward_1", "file"}} ("file" None, and no file, for a domain without a demo); the CLI prints it as the last line.
"""

from __future__ import annotations

import json
import os
import sys

from tqdm import tqdm

from tau2jax.config import ConfigError, csv
from tau2jax.data.chat import ChatFormat
from tau2jax.env import prompts, tau2_env
from tau2jax.env.environments import TaskRef
from tau2jax.env.gold import GoldEngine
from tau2jax.env.scripted_user import ScriptedUser
from tau2jax.eval import tau2_results
from tau2jax.inference import engine as engine_lib
from tau2jax.rl import collector
from tau2jax.stages import builders


def _train_tasks(domain: str, task_ids: list[str]) -> list:
    """The domain's train tasks (all of mock, which has no splits), or those among `task_ids`."""
    if not task_ids:
        return tau2_env.load_tasks(domain, "train")
    known = {t.id for t in tau2_env.load_tasks(domain, "base")}
    ids = [t for t in task_ids if t in known]
    test = [t for t in ids if "test" in tau2_env.split_of(domain, t)]
    if test:
        raise ConfigError(f"config.tau2.task_ids: {test} are {domain} test-split tasks; gold demos use train tasks only")
    return tau2_env.load_tasks(domain, "train", ids) if ids else []


def run(config) -> dict:
    if config.tau2.split != "train":
        raise ConfigError(f"config.tau2.split: gold demos are made from the train split only, got {config.tau2.split!r}")
    tau2_env.init_tau2(config.tau2.data_dir)
    domains = csv(config.tau2.domains)
    task_ids = csv(config.tau2.task_ids)
    per_domain = {d: _train_tasks(d, task_ids) for d in domains}
    if task_ids:
        found = {t.id for tasks in per_domain.values() for t in tasks}
        missing = [t for t in task_ids if t not in found]
        if missing:
            raise ConfigError(f"config.tau2.task_ids: {missing} are not train tasks of {domains}")

    chat = ChatFormat(builders.tokenizer(config))
    style = prompts.get_style(config.tau2.prompt_style)
    env = builders.tau2_environment(config, chat, tasks=[], user_for=lambda task, domain: ScriptedUser(task))
    sampling = engine_lib.SamplingParams(temperature=0.0, max_new_tokens=config.engine.max_new_tokens)
    episodes = [collector.Episode(TaskRef(d, t.id, t), 0, sampling, GoldEngine(t, style, chat))
                for d, tasks in per_domain.items() for t in tasks]
    os.makedirs(config.workdir, exist_ok=True)

    done = {}
    for ep, traj, _ in collector.play(env, episodes, concurrency=config.eval.concurrency, max_infra_retries=0,
                                      progress={"desc": builders.progress_name(config, "gold demos"), "unit": "task"}):
        done[ep.ref.key] = traj
        if not traj.success:
            why = traj.infra_error or json.dumps(traj.reward_info)[:500]
            tqdm.write(f"{ep.ref.key}: reward {traj.reward} ({traj.termination_reason}): {why}", file=sys.stderr)
    # tau2's own files beside ours: {workdir}/trajectories/<domain>.json (every replay, failures too)
    tau2_results.write_records(os.path.join(config.workdir, tau2_results.DIR_NAME), [t.to_dict() for t in done.values()],
                               config=config, num_trials=1, agent={"implementation": "tau2jax.gold", "llm": "gold"},
                               user={"implementation": "tau2jax.scripted_user"})  # fmt: skip
    summary = {}
    for domain, tasks in per_domain.items():  # files in split order, whatever order episodes finished in
        path = os.path.join(config.workdir, f"{domain}.jsonl")
        ok = [done[f"{domain}/{t.id}"] for t in tasks if done[f"{domain}/{t.id}"].success]
        if ok:  # no file without a demo: SFT refuses an empty data file
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(traj.sft_record(), ensure_ascii=False) + "\n" for traj in ok)
        elif os.path.exists(path):
            os.remove(path)  # a rerun's earlier file would claim demos this run did not make
        summary[domain] = {"replayed": len(tasks), "reward_1": len(ok), "file": path if ok else None}
    return summary
