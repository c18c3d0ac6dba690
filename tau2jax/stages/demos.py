"""Stage "demos": gold demonstrations of the train tasks, as SFT JSONL.

Each train task's expected actions are played through the full episode path (prompt style, chat
format, tool-call parsing, the real tau2 environment, the scripted user, tau2's evaluator) by the
GoldEngine. Every conversation that scores 1.0 is written to `{workdir}/{domain}.jsonl` as
{"messages": [...], "tools": [...]} in the configured prompt style, with the real tool outputs.
Test-split tasks are refused: demonstrations of them would leak the benchmark into training.

Returns {domain: {"replayed", "reward_1", "file"}}; the CLI prints it as the last line.
"""

from __future__ import annotations

import json
import os
import sys

from tqdm import tqdm

from tau2jax.config import ConfigError, csv
from tau2jax.env import episode, prompts, tau2_env
from tau2jax.env.gold import GoldEngine
from tau2jax.env.scripted_user import ScriptedUser
from tau2jax.inference import engine as engine_lib
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
    from tau2jax.data.chat import ChatFormat

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
    reward_config = builders.reward_config(config)
    sampling = engine_lib.SamplingParams(temperature=0.0, max_new_tokens=config.engine.max_new_tokens)
    os.makedirs(config.workdir, exist_ok=True)

    summary = {}
    bar = tqdm(total=sum(len(t) for t in per_domain.values()), desc="gold demos", unit="task", file=sys.stderr)
    for domain, tasks in per_domain.items():
        path = os.path.join(config.workdir, f"{domain}.jsonl")
        n_ok = 0
        with open(path, "w", encoding="utf-8") as f:
            for task in tasks:
                bar.set_postfix_str(f"{domain} {task.id[:40]}")
                traj = episode.run_episode(
                    task,
                    domain,
                    engine=GoldEngine(task, style, chat),
                    user=ScriptedUser(task),
                    chat=chat,
                    style=style,
                    sampling=sampling,
                    max_steps=config.tau2.max_steps,
                    max_errors=config.tau2.max_errors,
                    max_repairs=config.tau2.max_repairs,
                    reward_config=reward_config,
                )
                if traj.success:
                    n_ok += 1
                    f.write(json.dumps(traj.sft_record(), ensure_ascii=False) + "\n")
                else:
                    why = traj.infra_error or json.dumps(traj.reward_info)[:500]
                    tqdm.write(f"{domain} task {task.id}: reward {traj.reward} ({traj.termination_reason}): {why}", file=sys.stderr)
                bar.update()
        summary[domain] = {"replayed": len(tasks), "reward_1": n_ok, "file": path}
    bar.close()
    return summary
