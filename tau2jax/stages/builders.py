"""The library's pieces built from a run's config: the one place a ConfigDict becomes a model
config, first weights, a tokenizer, an engine, a user simulator or an environment. Stage runners
call these; the rooms below take plain arguments.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import threading

import jax
import jax.numpy as jnp

from tau2jax import config as config_lib
from tau2jax.data.chat import ChatFormat
from tau2jax.data.tokenizer import load_tokenizer, shipped_tokenizer_dir
from tau2jax.env import environments, prompts, tau2_env
from tau2jax.env.gold import GoldEngine
from tau2jax.env.rewards import RewardConfig
from tau2jax.env.toy import ToyEnvironment
from tau2jax.inference import weight_sync
from tau2jax.inference.jax_engine import JaxEngine, engine_dtype
from tau2jax.inference.server_pool import ServerPool
from tau2jax.inference.sglang_client import SGLangEngine
from tau2jax.models import configs as model_configs
from tau2jax.models import qwen3
from tau2jax.parallel import sharding
from tau2jax.rl import heldout
from tau2jax.weights.hf_read import HF_EXTRA_DIR
from tau2jax.weights.orbax_params import check_finite, restore_params


def process_index() -> int:
    return jax.process_index()


# ----------------------------------------------------------------------------- progress

pipeline_step = ""  # the pipeline step running now (stages/pipeline.py sets it): progress bars name it


def progress_name(config, what: str) -> str:
    """A progress bar's description: `what`, prefixed by the pipeline step running it ("eval_sft: eval")."""
    return f"{pipeline_step}: {what}" if pipeline_step else what


def say(line: str) -> None:
    """One status line on stderr (process 0): what a long silent phase is doing, where a run resumed."""
    if process_index() == 0:
        print(line, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- model

def tokenizer(config):
    """The Qwen3 tokenizer; None for the "toy" model, whose ids are the toy game's tokens (its SFT
    data is token records, env/toy.py gold_record)."""
    if config.model.name == "toy" and not (config.tokenizer.path or config.model.hf_dir):
        return None
    return load_tokenizer(config.tokenizer.path or config.model.hf_dir)


def model_config(config, tok=None) -> model_configs.ModelConfig:
    """model.init_from's model_config.json wins, then model.hf_dir's config.json, then model.name."""
    if config.model.init_from:
        path = os.path.join(config.model.init_from, "model_config.json")
        if not os.path.exists(path):
            raise config_lib.ConfigError(
                f"config.model.init_from: {config.model.init_from!r} has no model_config.json; "
                "convert HF weights with `python -m checkpoints_tools.hf_to_orbax`")
        with open(path) as f:
            cfg = model_configs.ModelConfig(**json.load(f))
    elif config.model.hf_dir:
        cfg = model_configs.from_hf_config(os.path.join(config.model.hf_dir, "config.json"))
    else:
        cfg = model_configs.get_model_config(config.model.name)
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise config_lib.ConfigError(
            f"config.model: vocab_size {cfg.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
    return cfg


def hf_extra_dir(config) -> str:
    """Where a trained export's tokenizer and HF config files come from: the start checkpoint's
    `hf_extra/`, else `model.hf_dir`, else the tokenizer in use (`tokenizer.path`, or the shipped
    Qwen3 files)."""
    extra = os.path.join(config.model.init_from, HF_EXTRA_DIR) if config.model.init_from else ""
    for d in (extra, config.model.hf_dir, config.tokenizer.path):
        if d and os.path.isdir(d):
            return d
    return shipped_tokenizer_dir()


def initial_params(config, model_cfg, mesh, param_shardings):
    """Random init directly into the sharded layout, or the converted checkpoint restored onto the mesh."""
    dtype = jnp.dtype(config.model.param_dtype)
    if config.model.init_from:
        say(f"loading model.init_from {config.model.init_from} ...")
        params, _ = restore_params(config.model.init_from, mesh=mesh)  # names, shapes vs its model config
        check_finite(params, f"config.model.init_from {config.model.init_from}")
        return jax.tree.map(lambda x: x.astype(dtype), params)
    init = jax.jit(lambda key: qwen3.init_params(model_cfg, key, dtype=dtype), out_shardings=param_shardings)
    return init(jax.random.key(config.seed))


def mesh(config):
    return sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)


# ----------------------------------------------------------------------------- engines

def builtin_engine(config):
    """The built-in engine on `engine.checkpoint` (an `hf_to_orbax` output, or an SFT run's
    `params/`) in `engine.dtype`; with more than one device, restored sharded on `config.mesh`.
    In a multi-process run (eval and RFT run on process 0 alone) it stays on this process's first
    device: a mesh over every process's devices would wait on the others."""
    e = config.engine
    if not e.checkpoint:
        raise config_lib.ConfigError("config.engine.checkpoint: the builtin engine needs converted weights "
                                     "(python -m checkpoints_tools.hf_to_orbax, or an SFT run's params/ dir)")
    dtype = engine_dtype(e.dtype)
    return JaxEngine.from_checkpoint(
        e.checkpoint, dtype=dtype, compute_dtype=dtype, mesh=mesh(config) if jax.device_count() > 1 and jax.process_count() == 1 else None,
        max_seq_len=e.max_seq_len, max_batch=e.max_batch, prefix_cache_tokens=e.prefix_cache_tokens,
        tokenizer=tokenizer(config), seed=config.seed, scheduler=e.scheduler)


def process_urls(urls: list[str], rank: int, count: int) -> list[str]:
    """Process `rank`'s share of the policy servers: every count-th one from its rank, or (fewer
    servers than processes) one server shared with the other processes of the same rank mod n."""
    return urls[rank::count] if len(urls) >= count else [urls[rank % len(urls)]]


# stage -> the config section whose `concurrency` is its episodes in flight
STAGE_CONCURRENCY = {"eval": "eval", "rft": "rft", "grpo": "rl.rollout"}


def request_concurrency(config) -> int:
    """Requests in flight per policy server: `engine.concurrency`, or (0) the stage's episodes in
    flight: each episode has at most one turn at a server at a time."""
    if config.engine.concurrency:
        return config.engine.concurrency
    section = config
    for name in STAGE_CONCURRENCY.get(config.stage, "eval").split("."):
        section = section[name]
    return section.concurrency


def sglang_engine(config, *, per_process: bool = False):
    """The SGLang client on `engine.url` (comma-separated: a `ServerPool` over every server, an
    episode's turns on one of them), once every server answers /health. `per_process`: only this
    process's share of the servers (`process_urls`; GRPO's rollouts run on every process)."""
    e = config.engine
    urls = config_lib.csv(e.url)
    if per_process:
        urls = process_urls(urls, jax.process_index(), jax.process_count())
    clients = [SGLangEngine(url, concurrency=request_concurrency(config), timeout_s=e.timeout_s,
                            max_retries=e.max_retries, api_key=e.api_key or None)
               for url in urls]
    engine = clients[0] if len(clients) == 1 else ServerPool(clients)
    engine.wait_ready(e.timeout_s)
    return engine


def policy_servers(config) -> list[str]:
    """The policy servers a config's engine talks to (none for an engine in this process)."""
    return config_lib.csv(config.engine.url) if config.engine.kind == "sglang" else []


def publish_root(config) -> str:
    """Where GRPO publishes its pushes to the policy servers (`weight_sync.default_root`)."""
    return weight_sync.default_root(config.workdir, policy_servers(config), config.rl.sync.weights_dir)


# What decides the weights an engine serves, per kind (resume checks: `stages/resume.run_settings`).
ENGINE_SETTINGS = {"builtin": ("engine.checkpoint", "engine.max_seq_len", "engine.dtype"),
                   "sglang": ("engine.url",), "gold": ()}  # fmt: skip


def engine_settings(config) -> dict:
    """{field: value}: the engine kind and its ENGINE_SETTINGS; the built-in engine's dtype resolved
    ("auto" is another dtype on another platform)."""
    fields = ("engine.kind", *ENGINE_SETTINGS.get(config.engine.kind, ()))
    out = {f: config.engine[f.split(".", 1)[1]] for f in fields}
    if config.engine.kind == "builtin":
        out["engine.dtype"] = engine_dtype(config.engine.dtype).name
    return out


# engine.kind -> the builder of one engine shared by every episode (thread-safe)
SHARED_ENGINES = {"builtin": builtin_engine, "sglang": sglang_engine}


class EngineUnavailable(RuntimeError):
    """engine.kind names an engine this build does not have."""


def engine_factory(config, chat, style):
    """-> `engine_for(task) -> Engine` for eval and RFT. Gold engines are per task (they play that
    task's script); the others are one engine shared by every episode."""
    kind = config.engine.kind
    if kind == "gold":
        return lambda task: GoldEngine(task, style, chat)
    if kind not in SHARED_ENGINES:
        raise EngineUnavailable(f"engine.kind={kind!r}: unknown engine; known: gold, {', '.join(SHARED_ENGINES)}")
    engine = SHARED_ENGINES[kind](config)
    return lambda task: engine


def rollout_engine(config, model_cfg, params, tok, version: int):
    """GRPO's engine holding `params` as policy `version`: the built-in engine in this process
    (weights pushed as device arrays; with several processes it gathers a whole copy onto this
    process's first device), or SGLang over HTTP (this process's share of the servers; weights
    published under `rl.sync.weights_dir`, `weight_sync.default_root`)."""
    if config.engine.kind == "builtin":
        dtype = engine_dtype(config.engine.dtype)
        return JaxEngine(jax.tree.map(lambda x: x.astype(dtype), params), model_cfg, tokenizer=tok,
                         max_seq_len=config.engine.max_seq_len, max_batch=config.engine.max_batch,
                         compute_dtype=dtype, prefix_cache_tokens=config.engine.prefix_cache_tokens,
                         policy_version=version, seed=config.seed, scheduler=config.engine.scheduler)
    if config.engine.kind == "sglang":
        engine = sglang_engine(config, per_process=True)
        engine.publication = weight_sync.Publication(model_cfg, publish_root(config), keep=config.rl.sync.keep)
        return engine
    raise config_lib.ConfigError(f"config.engine.kind={config.engine.kind!r}: GRPO needs builtin or sglang")


# ----------------------------------------------------------------------------- users, environments

def user_servers(config) -> list[str]:
    """The user simulator endpoints `user.base_url` lists (comma-separated; none for a scripted user)."""
    return config_lib.url_list(config.user.base_url, "user.base_url") if config.user.kind == "llm" else []


def user_factory(config, *, start: int | None = None):
    """-> `user_for(task, domain) -> tau2 BaseUser`, fresh per episode (`config.user`).

    An LLM user is built on one of `user.base_url`'s servers and keeps it for the whole episode (each
    rollout node serves its own user simulator); successive calls go round-robin over the servers
    (a counter under a lock: the same order of calls gives the same servers; an episode retried
    after an infrastructure failure is a new call, so it moves to the next server). `start`: the
    first call's server (default: this process's index, so the processes of a multi-process run do
    not all begin on the first server)."""
    u = config.user
    if u.kind == "scripted":
        from tau2jax.env.scripted_user import ScriptedUser  # tau2 (heavy): only the tau2 stages need it

        return lambda task, domain: ScriptedUser(task)
    from tau2jax.env.llm_user import LLMUser  # tau2 + litellm (heavy): only LLM users need them

    urls = user_servers(config)
    start = process_index() if start is None else start
    tools: dict[str, list | None] = {}  # user tool schemas per domain (only schemas are used)
    lock = threading.Lock()
    calls = itertools.count(start)

    def user_for(task, domain):
        with lock:
            if domain not in tools:
                env = tau2_env.make_environment(domain)
                tools[domain] = env.get_user_tools() if env.user_tools is not None else None
            url = urls[next(calls) % len(urls)]
        # as tau2's own runner: the task's user scenario as instructions
        return LLMUser(tools=tools[domain] or None, instructions=str(task.user_scenario), model=u.model,
                       base_url=url, api_key=u.api_key, temperature=u.temperature, top_p=u.top_p,
                       top_k=u.top_k, min_p=u.min_p, presence_penalty=u.presence_penalty,
                       frequency_penalty=u.frequency_penalty, repetition_penalty=u.repetition_penalty,
                       max_tokens=u.max_tokens, sglang_params=u.sglang_params, timeout_s=u.timeout_s,
                       max_retries=u.max_retries, backoff_s=u.retry_backoff_s)

    return user_for


def reward_config(config):
    return RewardConfig.from_config(config.reward)


def tau2_tasks(config, split: str | None = None) -> list:
    """TaskRefs of `tau2.domains` / `split` (default `tau2.split`), only `tau2.task_ids` when given."""
    tau2_env.init_tau2(config.tau2.data_dir)
    wanted = set(config_lib.csv(config.tau2.task_ids))
    split = split or config.tau2.split
    tasks = [environments.TaskRef(d, t.id, t) for d in config_lib.csv(config.tau2.domains)
             for t in tau2_env.load_tasks(d, split) if not wanted or t.id in wanted]
    if not tasks:
        raise config_lib.ConfigError(f"config.tau2: no task in domains {config.tau2.domains!r}, split {split!r}"
                                     + (f", ids {sorted(wanted)}" if wanted else ""))
    return tasks


def tau2_environment(config, chat, *, split: str | None = None, tasks: list | None = None, user_for=None):
    """The tau2 tasks of the config (or `tasks`: [] for a stage that names each episode's task),
    played with its prompt style, user simulator (or `user_for`), limits and rewards."""
    return environments.Tau2Environment(tau2_tasks(config, split) if tasks is None else tasks, chat,
                           style=prompts.get_style(config.tau2.prompt_style),
                           user_for=user_for or user_factory(config), reward_config=reward_config(config),
                           max_steps=config.tau2.max_steps, max_errors=config.tau2.max_errors,
                           max_repairs=config.tau2.max_repairs)


def heldout_environment(config):
    """The held-out environment and its task refs (the first `rl.heldout_tasks` taken round-robin
    over the domains; 0 = all)."""
    if config.rl.env == "toy":
        toy = config.rl.toy
        env = ToyEnvironment(num_tasks=config.rl.heldout_tasks or toy.tasks, seed=config.seed, split="test",
                             shared_table=toy.shared_table, turn_latency_s=toy.turn_latency_s)
    else:
        test = config.copy_and_resolve_references()
        test.tau2.task_ids = ""  # the training task list names train ids: the whole test split here
        env = tau2_environment(test, ChatFormat(tokenizer(config)), split="test")
    refs = heldout.interleave_domains(env.tasks())
    return env, refs[: config.rl.heldout_tasks] if config.rl.heldout_tasks else refs


def rl_environment(config):
    """RL's environment -> (environment, tokenizer or None, model config): the toy game, or tau2's
    train split."""
    if config.rl.env == "toy":
        env = ToyEnvironment(num_tasks=config.rl.toy.tasks, seed=config.seed, shared_table=config.rl.toy.shared_table,
                             turn_latency_s=config.rl.toy.turn_latency_s)
        return env, None, model_config(config)

    tok = tokenizer(config)
    return tau2_environment(config, ChatFormat(tok), split="train"), tok, model_config(config, tok)
