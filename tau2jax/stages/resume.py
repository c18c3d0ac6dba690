"""The resume-settings check shared by the stages that resume from their records (eval, rft).

A rerun in the same workdir must produce episodes the way the earlier run did: `run_settings` picks
the config values that decide what an episode produces, `settings.json` records them (plus the
engine's identity), and a mismatch is a `ConfigError` naming each field and both values rather
than a silently mixed report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tau2jax import config as config_lib
from tau2jax.learn import optimizer
from tau2jax.stages import builders

SETTINGS = "settings.json"

# Config fields that change what an episode produces: a resumed run must not mix values (plus the
# sampling section's temperature/top_p/top_k and every reward.* field: `run_settings`).
RESULT_FIELDS = (
    "seed", "tau2.split", "tau2.prompt_style", "tau2.max_steps", "tau2.max_errors", "tau2.max_repairs",
    "tokenizer.path", "model.hf_dir",  # the tokenizer (model.hf_dir when tokenizer.path is "")
    "engine.max_new_tokens",  # plus the engine's own: builders.engine_settings
    "user.kind",
)  # fmt: skip
# ... and those that matter for one engine or user kind only (the engine's: builders.engine_settings;
# the served weights: Engine.identity). user.base_url counts as engine.url does: a user server has
# no identity to check (which model answers is known only by where it is), so another list of
# URLs may be another user simulator.
USER_FIELDS = {"llm": ("user.model", "user.base_url", "user.temperature", "user.top_p", "user.top_k", "user.min_p",
                       "user.presence_penalty", "user.frequency_penalty", "user.repetition_penalty",
                       "user.max_tokens", "user.sglang_params"),
               "scripted": ()}  # fmt: skip


def run_settings(config, data_root, sampling: str = "eval", extra: tuple = ()) -> dict:
    """The config values that decide what an episode produces (plus the tau2 data in use); `sampling`
    names the section holding temperature/top_p/top_k (eval, rft); `extra`: the stage's own fields."""
    fields = (RESULT_FIELDS + tuple(f"{sampling}.{k}" for k in ("temperature", "top_p", "top_k"))
              + tuple(f"reward.{k}" for k in config.reward) + tuple(extra)
              + USER_FIELDS.get(config.user.kind, ()))
    out = {f: _cfg_get(config, f) for f in fields} | builders.engine_settings(config)
    return out | {"tau2.data_root": str(data_root)}


def load_settings(out_dir: Path) -> dict | None:
    """The settings an earlier run in out_dir recorded, or None."""
    path = out_dir / SETTINGS
    return json.loads(path.read_text()) if path.exists() else None


def check_same_settings(out_dir: Path, earlier: dict | None, current: dict, stage: str = "eval") -> None:
    """Refuses, naming each field, to resume a run recorded with other settings (a field the
    earlier run did not record counts as changed). Shared by the eval and rft stages."""
    if earlier is None:
        return
    diff = {f: (earlier.get(f), v) for f, v in current.items() if earlier.get(f) != v}
    if diff:
        lines = ", ".join(f"{f}: {a!r} -> {b!r}" for f, (a, b) in diff.items())
        raise config_lib.ConfigError(
            f"workdir {str(out_dir)!r} holds an {stage} run with other settings ({lines}); "
            "use a new config.workdir, or the earlier values to resume"
        )


def record_settings(out_dir: Path, earlier: dict | None, settings: dict, identity: dict | None,
                    stage: str = "eval") -> dict:
    """Adds the engine's identity (None when no episode runs, so no engine was built: the earlier
    run's fields stand), checks it against the earlier run, writes settings.json. -> the settings."""
    if identity is not None:
        settings = settings | identity
        check_same_settings(out_dir, earlier, settings, stage)
    else:
        settings = settings | {k: v for k, v in (earlier or {}).items() if k not in settings}
    write_atomic(out_dir / SETTINGS, json.dumps(settings, indent=2, sort_keys=True))
    return settings


def check_records(out_dir: Path, finished: dict[tuple, dict], policy_version) -> None:
    """Every kept record must come from the run's policy version (else the report mixes policies)."""
    for key, rec in sorted(finished.items()):
        other = [v for v in rec["policy_versions"] if v != policy_version]
        if other:
            raise config_lib.ConfigError(
                f"workdir {str(out_dir)!r}: the record of {key} has policy_version {other[0]!r}, this run's "
                f"engine serves {policy_version!r}; use a new config.workdir (one report, one policy)"
            )


def _cfg_get(config, dotted: str):
    section, _, key = dotted.rpartition(".")
    return (config[section] if section else config)[key]


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- learner stages (sft, grpo)

TRAIN_SETTINGS = "train_settings.json"  # in the workdir, beside checkpoints/
# What a resumed SFT / GRPO run must share with the run that saved its checkpoints: the model and
# its first weights, the data (SFT) or the tasks and the loss (GRPO), the optimizer and its
# schedule; `steps` (train.steps resolved, or rl.steps) is checked on its own (`check_train_resume`).
MODEL_FIELDS = ("seed", "model.name", "model.hf_dir", "model.init_from", "model.param_dtype", "tokenizer.path")
SFT_FIELDS = ("data.train_files", "data.max_len", "data.batch_size", "data.overlong", "data.shuffle",
              "data.num_epochs")
GRPO_FIELDS = ("rl.env", "tau2.domains", "tau2.task_ids", "rl.tasks_per_step", "rl.samples_per_task",
               "rl.std_normalize", "rl.dynamic_sampling", "rl.curriculum", "rl.toy.tasks", "rl.toy.shared_table",
               "rl.rollout.temperature", "rl.rollout.top_p", "rl.rollout.top_k", "rl.batch.max_len")


def train_settings(config, steps: int) -> dict:
    """The settings a resumed SFT / GRPO run must keep (`steps`: the run's total optimizer steps)."""
    fields = MODEL_FIELDS + (SFT_FIELDS if config.stage == "sft" else GRPO_FIELDS)
    fields += tuple(f"optim.{k}" for k in config.optim)
    if config.stage == "grpo":
        fields += tuple(f"rl.loss.{k}" for k in config.rl.loss) + tuple(f"reward.{k}" for k in config.reward)
    return {f: _cfg_get(config, f) for f in fields} | {"steps": steps}


def _warmup(config, steps: int) -> int:
    return int(round(config.optim.warmup_frac * steps))  # as learn/optimizer.make_schedule


def check_train_resume(workdir: str, config, current: dict, start: int) -> list[str]:
    """Refuses (ConfigError naming each field and both values) to resume at `start` a run recorded in
    `workdir` with other settings. `steps` may change where the schedule from `start` on stays the
    same (a constant schedule whose warmup has ended under both step counts), or grow once the run
    has finished (start = its steps: training longer is asked for, and the steps after `start`
    follow the longer run's schedule, said in the note). Mid-run, a cosine schedule's decay spans
    the whole run, so another step count would change every learning rate after `start`: refused.
    -> notes on what changed."""
    path = Path(workdir) / TRAIN_SETTINGS
    if not path.exists():
        return []  # a run from before this record: nothing to compare
    earlier = json.loads(path.read_text())
    diff = {f: (earlier.get(f), v) for f, v in current.items() if earlier.get(f) != v}
    notes = []
    if "steps" in diff:
        old, new = diff["steps"]
        if (config.optim.schedule == "constant" and isinstance(old, int)
                and max(_warmup(config, old), _warmup(config, new)) <= start):
            diff.pop("steps")
            notes.append(f"steps {old} -> {new}: the constant learning rate after step {start} is unchanged")
        elif isinstance(old, int) and start >= old and new > old:
            diff.pop("steps")
            lr = float(optimizer.make_schedule(config.optim, new)(start))
            notes.append(f"steps {old} -> {new}: the run had finished at step {old}; steps {old + 1}-{new} follow "
                         f"the {config.optim.schedule} schedule of a {new}-step run (lr {lr:.3g} at step {old + 1})")
        else:
            field = "train.steps" if config.stage == "sft" else "rl.steps"
            why = ("a cosine schedule decays over the whole run, so another step count changes the learning rate "
                   "of every step after the checkpoint" if config.optim.schedule == "cosine" else
                   f"the warmup ({config.optim.warmup_frac} of the steps) would move past step {start}")
            raise config_lib.ConfigError(
                f"config.{field}: workdir {workdir!r} holds a {config.stage} run of {old} steps at step {start}, "
                f"this one asks for {new}; {why}: use {old}, or a new config.workdir with "
                "model.init_from set to the run's params")
    if diff:
        lines = ", ".join(f"{f}: {a!r} -> {b!r}" for f, (a, b) in diff.items())
        raise config_lib.ConfigError(
            f"config: workdir {workdir!r} holds a {config.stage} run with other settings ({lines}); "
            "use a new config.workdir, or the earlier values to resume")
    return notes


def record_train_settings(workdir: str, settings: dict) -> None:
    if builders.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        write_atomic(Path(workdir) / TRAIN_SETTINGS, json.dumps(settings, indent=2, sort_keys=True))


def latest_listed_step(directory: str) -> int | None:
    """The newest step directory (Orbax names them by step) under `directory`, read or not."""
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []
    return max(steps, default=None)


def has_checkpoints(directory: str) -> bool:
    return latest_listed_step(directory) is not None
