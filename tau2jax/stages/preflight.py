"""Checks before the first step of a stage: what would otherwise fail hours in (the pipeline runs
demos and the base eval before SFT builds its mesh) fails in seconds, naming the setting and the fix,
before anything is written.

- learner (sft, grpo, and the pipeline's sft / sft_rft / grpo steps): the mesh against the visible
  devices, batch divisibility, and a per-device memory estimate (`learn.memory`) against the
  devices' memory;
- the policy servers (SGLang: `builders.policy_servers`): healthy (/health), its `weight_version` and served
  `model_path` (a local directory must hold config, tokenizer and safetensors);
- the user simulators (`user.kind=llm`): every OpenAI endpoint `user.base_url` lists answers /models;
- the workdir: writable, with disk space for checkpoints and published weight versions.
"""

from __future__ import annotations

import os
import shutil
import socket

import httpx
import jax
import psutil

from tau2jax import config as config_lib
from tau2jax.env import tau2_env
from tau2jax.inference.sglang_client import API_KEY_ENV, HEALTH_TIMEOUT_S
from tau2jax.learn.memory import learner_bytes
from tau2jax.models.configs import num_params
from tau2jax.stages import builders, pipeline_steps

LEARNER_STAGES = ("sft", "grpo")
ENDPOINT_STAGES = ("eval", "rft", "grpo", "pipeline")
SPLIT_STAGES = ("eval", "pipeline")  # read tau2.split (demos, rft and grpo use "train" and say so)
MEMORY_HEADROOM = 0.9  # XLA needs some of a device for itself


def check(config) -> None:
    """Raises ConfigError on the first problem found."""
    if config.stage in SPLIT_STAGES:
        check_split(config)
    learners = _learner_configs(config)
    for c in learners:
        check_learner(c)
    plays = not (config.stage == "eval" and config.eval.from_tau2_results)  # a report on tau2 files plays nothing
    if config.stage in ENDPOINT_STAGES and plays:
        if builders.policy_servers(config):
            check_policy_server(config)
        if config.user.kind == "llm":
            check_user_server(config)
    check_workdir(config, learners)


def check_split(config) -> None:
    """tau2.split names a split of every domain in tau2.domains (mock included: base, train, test)."""
    tau2_env.init_tau2(config.tau2.data_dir)
    for domain in config_lib.csv(config.tau2.domains):
        names = tau2_env.split_names(domain)
        if config.tau2.split not in names:
            raise config_lib.ConfigError(f"config.tau2.split: {domain} has no split {config.tau2.split!r}; "
                                         f"use one of {names}")


def _learner_configs(config) -> list:
    if config.stage in LEARNER_STAGES:
        return [config]
    if config.stage != "pipeline":
        return []
    start = config.model.init_from  # stands in for every step's input weights: same shapes
    inputs = {"demo_files": [], "rft_file": "", "params": {s: start for s, _, _ in pipeline_steps.STEPS}}
    return [pipeline_steps.step_config(config, step, inputs) for step, stage, _ in pipeline_steps.STEPS
            if stage in LEARNER_STAGES]


def check_learner(config) -> None:
    where = f"({config.stage} step in {config.workdir})"
    try:
        mesh = builders.mesh(config)
    except config_lib.ConfigError as e:
        raise config_lib.ConfigError(f"{e} {where}; the trainer sees {jax.device_count()} "
                                     f"{jax.default_backend()} devices (launch/gpu_node.sh: TRAIN_GPUS)") from None
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.stage == "sft":
        micro = config.data.batch_size // config.optim.grad_accum
        if micro % dp:
            raise config_lib.ConfigError(
                f"config.data.batch_size: {config.data.batch_size} rows / {config.optim.grad_accum} micro-batches "
                f"must divide over the {dp} data-parallel devices {where}; use a multiple of {dp * config.optim.grad_accum}")
        rows, seq_len = micro // dp, config.data.max_len
    else:
        rows, seq_len = max(1, config.rl.batch.micro_batch_rows), config.rl.batch.max_len

    est = learner_bytes(builders.model_config(config), param_dtype=config.model.param_dtype,
                        compute_dtype=config.model.compute_dtype, shards=mesh.shape["fsdp"] * mesh.shape["tensor"],
                        rows=rows, seq_len=seq_len, remat=config.model.remat, loss_chunk=config.train.loss_chunk,
                        reference=config.stage == "grpo" and bool(config.rl.loss.kl_coef))
    have = device_memory_bytes()
    if est["total"] > MEMORY_HEADROOM * have:
        terms = ", ".join(f"{k} {v / 2**30:.1f}" for k, v in est.items() if k != "total")
        raise config_lib.ConfigError(
            f"the learner needs ~{est['total'] / 2**30:.1f} GiB per device ({terms} GiB) but a device has "
            f"{have / 2**30:.1f} GiB {where}: shard over more devices (mesh.fsdp), shorten rows "
            f"(data.max_len / rl.batch.max_len), use model.remat=full or a smaller train.loss_chunk")


def device_memory_bytes() -> int:
    """One device's memory: the accelerator's limit, or on CPU the host's RAM shared by its devices."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])

    return psutil.virtual_memory().total // jax.local_device_count()


def _auth(key: str) -> dict:
    """The servers' --api-key, as the clients send it (SGLang: "Authorization: Bearer <key>")."""
    return {"Authorization": f"Bearer {key}"} if key and key != "EMPTY" else {}


def check_policy_server(config) -> None:
    key = config.engine.api_key or os.environ.get(API_KEY_ENV, "")  # as SGLangEngine takes it
    for url in config_lib.csv(config.engine.url):
        _check_policy_url(url.rstrip("/"), _auth(key))


def _check_policy_url(url: str, headers: dict) -> None:
    fix = "start it (launch/gpu_node.sh) or point config.engine.url at it"
    try:
        r = httpx.get(f"{url}/health", timeout=httpx.Timeout(HEALTH_TIMEOUT_S, connect=5.0))
        info = httpx.get(f"{url}/get_model_info", timeout=10.0, headers=headers) if r.status_code == 200 else None
        if info is not None and info.status_code == 401:
            raise config_lib.ConfigError(f"config.engine.api_key: policy server {url} refused the key (401); give the "
                                         f"trainer the servers' --api-key (engine.api_key or ${API_KEY_ENV})")
        info = info.json() if info is not None and info.status_code == 200 else {}
    except httpx.HTTPError as e:
        raise config_lib.ConfigError(f"config.engine.url: policy server {url} unreachable{_from_here()} "
                                     f"({type(e).__name__}: {e}); {fix} (a server on another node must bind its "
                                     "cluster address: launch/gpu_node.sh with BIND_HOST)") from None
    if r.status_code != 200:
        raise config_lib.ConfigError(f"config.engine.url: policy server {url}/health answered {r.status_code} "
                                     f"(still loading, or failing); {fix}")
    path = info.get("model_path") or ""
    if os.path.isdir(path):  # a path on another node cannot be checked from here
        check_model_dir(path, f"the policy server {url} serves")


def _from_here() -> str:
    """In a multi-process run every process checks the servers: say which one could not reach it."""
    if jax.process_count() == 1:
        return ""
    return f" from process {jax.process_index()} on {socket.gethostname()}"


def check_model_dir(path: str, what: str) -> None:
    """A directory SGLang can launch from: config.json, a tokenizer, safetensors weights."""
    names = set(os.listdir(path))
    missing = [want for want, ok in (("config.json", "config.json" in names),
                                     ("tokenizer.json", "tokenizer.json" in names),
                                     ("*.safetensors", any(n.endswith(".safetensors") for n in names))) if not ok]
    if missing:
        raise config_lib.ConfigError(
            f"{what} {path}, which lacks {', '.join(missing)}; export a complete directory with "
            "`python -m checkpoints_tools.orbax_to_hf --orbax-dir RUN/params --out DIR` (it carries the tokenizer)")


def check_user_server(config) -> None:
    """Every endpoint `user.base_url` lists answers /models (an episode may land on any of them)."""
    for url in builders.user_servers(config):
        _check_user_url(url.rstrip("/"), _auth(config.user.api_key))


def _check_user_url(url: str, headers: dict) -> None:
    try:
        r = httpx.get(f"{url}/models", timeout=httpx.Timeout(10.0, connect=5.0), headers=headers)
    except httpx.HTTPError as e:
        raise config_lib.ConfigError(f"config.user.base_url: user simulator {url} unreachable{_from_here()} "
                                     f"({type(e).__name__}: {e}); start it (launch/gpu_node.sh) or point config.user.base_url at it") from None
    if r.status_code == 401:
        raise config_lib.ConfigError(f"config.user.api_key: user simulator {url} refused the key (401); give the "
                                     "trainer the servers' --api-key (config.user.api_key)")
    if r.status_code != 200:
        raise config_lib.ConfigError(f"config.user.base_url: user simulator {url}/models answered {r.status_code}")


def check_workdir(config, learners: list) -> None:
    """Writable, with room for the learner's checkpoints (params + Adam, `train.keep_checkpoints`
    of them) and, against SGLang, the published bf16 versions."""
    root = os.path.abspath(config.workdir)
    existing = _existing(root)
    if not os.access(existing, os.W_OK):
        raise config_lib.ConfigError(f"config.workdir: {root} is not writable ({existing} refuses writes); "
                                     "pick a directory you can write")
    need, elsewhere = 0, {}  # published weights on another filesystem (/dev/shm): checked apart
    for c in learners:
        n = num_params(builders.model_config(c))
        need += n * (4 + 8) * (c.train.keep_checkpoints + 1)  # fp32 params + Adam, plus the export
        if c.stage == "grpo" and builders.policy_servers(c):
            pub = _existing(builders.publish_root(c))
            if os.stat(pub).st_dev == os.stat(existing).st_dev:
                need += n * 2 * c.rl.sync.keep  # the bf16 versions weight sync keeps
            else:
                elsewhere[pub] = elsewhere.get(pub, 0) + n * 2 * c.rl.sync.keep
    for pub, size in elsewhere.items():
        if size > shutil.disk_usage(pub).free:
            raise config_lib.ConfigError(f"config.rl.sync.weights_dir: published weights need ~{size / 2**30:.1f} GiB under "
                                         f"{pub}, {shutil.disk_usage(pub).free / 2**30:.1f} GiB free; set "
                                         "rl.sync.weights_dir or lower rl.sync.keep")
    free = shutil.disk_usage(existing).free
    if need > free:
        raise config_lib.ConfigError(f"config.workdir: {root} needs ~{need / 2**30:.1f} GiB for checkpoints and "
                                     f"published weights, {free / 2**30:.1f} GiB free; free space or move the workdir")


def _existing(path: str) -> str:
    """`path`, or its nearest ancestor that exists."""
    path = os.path.abspath(path)
    while not os.path.isdir(path):
        path = os.path.dirname(path)
    return path
