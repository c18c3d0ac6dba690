"""Config schema: every field with its default and type, plus validation with clear errors.

Config files (`configs/*.py`) start from `default_config()` and override fields. The returned
ConfigDict is locked, so a misspelt key (in a file or on the command line) is rejected by name,
and ml_collections rejects a value of the wrong type on assignment.
"""

from __future__ import annotations

import difflib
import importlib.util
import os

import ml_collections

from tau2jax.models.configs import known_sizes

RANDOM_INIT_SIZES = ("tiny", "toy")  # model.name values SFT / GRPO may start from random weights
STAGES = ("sft", "demos", "eval", "rft", "grpo", "pipeline")
PROMPT_STYLES = ("recipe", "native")
DOMAINS = ("mock", "airline", "retail", "telecom")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "sft"
    c.seed = 0
    c.workdir = "runs/default"  # checkpoints, TensorBoard events, reports

    # Model: a named size, or `hf_dir` with config.json (+ weights for init).
    c.model = ml_collections.ConfigDict()
    c.model.name = "tiny"
    c.model.hf_dir = ""  # HF checkpoint dir: config.json (size) and tokenizer
    c.model.init_from = ""  # an Orbax dir from checkpoints_tools.hf_to_orbax; "" = random init (see random_init)
    # SFT / GRPO without init_from start from random weights only for the CPU sizes (RANDOM_INIT_SIZES)
    # or when this says so: a larger model (model.hf_dir, a named Qwen3 size) is refused otherwise.
    c.model.random_init = False
    c.model.param_dtype = "float32"  # master weights
    c.model.compute_dtype = "float32"  # bfloat16 on GPU
    c.model.remat = "none"  # none | full | dots | attn (what to save in the backward pass; see qwen3._REMAT)
    c.model.attn_impl = "xla"  # xla | flash (Pallas/Triton, segment ids) | cudnn (cuDNN packed layout); last two GPU
    c.model.attn_max_segments = 16  # cudnn: most segments (runs, padding included) a packed row may hold
    c.model.attn_chunk = 0  # xla: queries per attention block in training; 0 = dense [T, T] scores

    # Device mesh; -1 takes the remaining devices.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""  # dir with tokenizer.json; "" = model.hf_dir, else the shipped Qwen3 files

    # SFT data (JSONL, one OpenAI-format conversation per line).
    c.data = ml_collections.ConfigDict()
    c.data.train_files = ""  # comma-separated paths or globs
    c.data.max_len = 1024  # tokens per packed row
    c.data.batch_size = 8  # packed rows per global batch
    c.data.overlong = "truncate"  # truncate | drop
    c.data.shuffle = True
    c.data.num_epochs = 1

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-5
    c.optim.schedule = "cosine"  # cosine | constant
    c.optim.warmup_frac = 0.05
    c.optim.min_lr_ratio = 0.0
    c.optim.weight_decay = 0.01
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.clip_norm = 1.0
    c.optim.grad_accum = 1  # micro-batches per optimizer step

    c.train = ml_collections.ConfigDict()
    c.train.steps = 0  # 0 = derive from data.num_epochs
    c.train.log_every = 1
    c.train.loss_chunk = 0  # tokens per chunk of the vocab projection in the loss (0 = whole row)
    c.train.checkpoint_every = 100
    c.train.keep_checkpoints = 3
    c.train.async_checkpoint = True

    # tau2-bench episodes.
    c.tau2 = ml_collections.ConfigDict()
    c.tau2.domains = "airline,retail,telecom"
    c.tau2.split = "test"
    c.tau2.task_ids = ""  # comma-separated subset; "" = the whole split
    c.tau2.data_dir = ""  # a tau2-bench data dir (…/data/tau2/domains parent); "" = the wheel's; env TAU2JAX_DATA_DIR
    c.tau2.prompt_style = "native"  # native | recipe
    c.tau2.max_steps = 100
    c.tau2.max_errors = 10
    c.tau2.max_repairs = 1  # format-repair prompts per agent turn after unparseable output (recipe: 1)

    # User simulator.
    c.user = ml_collections.ConfigDict()
    c.user.kind = "scripted"  # scripted | llm
    c.user.model = "openai/qwen3-4b"  # litellm model name
    # The user simulator's OpenAI endpoint, or several comma-separated (one per rollout node: each
    # episode keeps one for all its turns; episodes go round-robin over them, `builders.user_factory`).
    c.user.base_url = "http://127.0.0.1:30001/v1"
    c.user.api_key = "EMPTY"
    # Every sampling parameter is sent with each request, so the user's behaviour does not follow the
    # server's defaults: SGLang >= 0.5.2x (`--sampling-defaults model`) fills an omitted one from the
    # model's generation_config.json, 0.5.3 from its own neutral ones. These are the neutral ones
    # (the recipe states only T=0.7 for its user simulator).
    c.user.temperature = 0.7
    c.user.top_p = 1.0
    c.user.top_k = -1  # SGLang's "off"
    c.user.min_p = 0.0
    c.user.presence_penalty = 0.0
    c.user.frequency_penalty = 0.0
    c.user.repetition_penalty = 1.0  # 1 = off
    # Bound on a user turn's tokens: a chat request without max_tokens runs to the context limit in SGLang.
    c.user.max_tokens = 1024
    # Send top_k, min_p, repetition_penalty (SGLang's fields, outside OpenAI's API) in the request
    # body; False for an endpoint that rejects unknown fields (api.openai.com).
    c.user.sglang_params = True
    c.user.timeout_s = 120.0
    c.user.max_retries = 3
    c.user.retry_backoff_s = 1.0  # first retry wait; doubles per retry (capped at 30 s)

    # Policy engine.
    c.engine = ml_collections.ConfigDict()
    c.engine.kind = "builtin"  # builtin | sglang | gold
    # sglang: the policy server, or several comma-separated (an episode stays on one; pushes reach all)
    c.engine.url = "http://127.0.0.1:30000"
    c.engine.checkpoint = ""  # builtin: converted weights (hf_to_orbax output or an SFT run's params/)
    c.engine.max_seq_len = 32768  # builtin: context (prompt + generated); the largest KV-cache bucket
    c.engine.max_batch = 16  # builtin: sequences decoded together
    # builtin: static = each batch runs until its longest row ends; continuous = requests join and
    # leave the running batch between decode chunks (tau2jax/inference/jax_engine.py)
    c.engine.scheduler = "static"
    c.engine.dtype = "auto"  # builtin: weights, compute and KV cache; auto = bfloat16 on GPU, else float32
    # builtin: KV slots kept for prefix reuse across turns (0 = off); Qwen3-4B bf16: 144 KiB a slot,
    # so 64K slots = 9 GiB, enough for 8 concurrent episodes of 8K tokens.
    c.engine.prefix_cache_tokens = 65536
    c.engine.max_new_tokens = 1200
    c.engine.timeout_s = 300.0
    c.engine.max_retries = 3
    # sglang: the servers' --api-key, sent as "Authorization: Bearer <key>"; "" = $TAU2JAX_API_KEY
    # (launch/gpu_node.sh exports it to the servers and the trainer), unset = no key
    c.engine.api_key = ""
    # sglang: /generate calls in flight per server; 0 = the stage's episode concurrency (eval, rft or
    # rl .concurrency), so every episode in flight can have its turn at the server at once
    c.engine.concurrency = 0

    c.eval = ml_collections.ConfigDict()
    c.eval.num_samples = 4
    c.eval.temperature = 0.8
    c.eval.top_p = 1.0
    c.eval.top_k = 20
    c.eval.concurrency = 4  # episodes in flight
    c.eval.max_infra_retries = 2
    c.eval.max_tasks_per_domain = 0  # first N tasks of each domain split (smoke runs); 0 = all
    c.eval.floor = True  # report the do-nothing floor (tau2jax/eval/floor.py) beside Pass@k
    c.eval.floor_cache_dir = ""  # floor outcomes per task; "" = $XDG_CACHE_HOME/tau2jax/floor
    # tau2 Results files and the leaderboard submission.json (tau2jax/eval/tau2_results.py)
    c.eval.model_name = ""  # the files' agent llm and the submission's model_name; "" = from the weights' path
    c.eval.organization = ""  # submission.json's organization ("" = "unspecified")
    c.eval.contact_email = ""  # submission.json's contact_info.email
    c.eval.from_tau2_results = ""  # tau2 Results files (comma-separated, globs): report on them, play nothing

    # Shaped reward: shaped = reward + alpha * partial.
    c.reward = ml_collections.ConfigDict()
    c.reward.preset = ""  # "" = the fields below | cookbook | recipe_code (env/rewards.py PRESETS)
    c.reward.alpha = 0.3
    c.reward.w_action = 0.7
    c.reward.w_env_assertion = 0.2
    c.reward.w_communicate = 0.1
    # tau2's action check ignores extra and wrong calls (env/rewards.py): without these, partial
    # credit in an all-fail group favours the episode that sprayed the most calls. Presets keep
    # the published, precision-blind credit.
    c.reward.action_precision = True  # action term = one-to-one recall × hits / (hits + wrong + extra reads)
    c.reward.wrong_call_penalty = 0.05  # per wrong call, on the partial score's [0, 1] scale

    # Rejection-sampling fine-tuning (stage rft): sample train tasks, keep successes as SFT data.
    c.rft = ml_collections.ConfigDict()
    c.rft.samples = 8  # episodes per train task (recipe: 4-8)
    c.rft.temperature = 0.8  # recipe: T 0.8, top_p 1, no top_k
    c.rft.top_p = 1.0
    c.rft.top_k = 0
    c.rft.min_partial = 0.6  # a task with no success keeps its best episode if its partial >= this
    c.rft.concurrency = 8  # episodes in flight
    c.rft.max_infra_retries = 2
    c.rft.mix_files = ""  # comma-separated SFT JSONL appended to kept.jsonl as is (e.g. gold demos)

    # GRPO (stage grpo, tau2jax/stages/grpo.py): K samples per task per step, rollouts on worker threads.
    # The algorithm here; by concern below it: rl.rollout (sampling, episodes in flight), rl.sync
    # (weight pushes), rl.loss (the policy loss), rl.batch (packing learner rows), rl.toy (the toy game).
    c.rl = ml_collections.ConfigDict()
    c.rl.env = "tau2"  # tau2 (tau2.* tasks, split train) | toy (env/toy.py lookup game: rl.toy)
    c.rl.steps = 200  # optimizer steps = rollout rounds (recipe: 200)
    c.rl.tasks_per_step = 16  # recipe: 16 tasks × 4 samples = 64 trajectories per step
    c.rl.samples_per_task = 4
    c.rl.std_normalize = True  # GRPO (r - mean) / std; False = Dr.GRPO (r - mean)
    c.rl.dynamic_sampling = False  # drop zero-variance groups and refill with other tasks (DAPO)
    c.rl.max_refill_rounds = 2
    # A step is an optimizer update: a step whose rollouts left nothing to train (all failed, all
    # dropped) is played again on fresh groups, at most this many times, then the run stops.
    c.rl.max_empty_rounds = 3
    c.rl.curriculum = False  # recipe's per-task weights on advantages (shared tracker, checkpointed)
    c.rl.repeat_penalty = 0.0  # subtracted per repeated identical tool call (0 = metric only)
    # Asynchrony (tau2jax/rl/rollout_workers.py): groups for learner step s start once the engine serves
    # version >= s - max_staleness, so rollouts overlap the learner; 0 = synchronous.
    c.rl.max_staleness = 0
    c.rl.stale_policy = "drop"  # over the bound: drop (ledger "stale") | correct (token TIS, rl.loss.tis_cap or 2.0)
    # Held-out evaluation (rl/heldout.py): every eval_every steps (0 = off; a multiple of
    # rl.sync.every), greedy and sampled pass@1 on tasks never trained on (toy: its test split; tau2:
    # the test split), metrics heldout_greedy_pass1 / heldout_sampled_pass1; the best greedy pass@1's
    # weights are exported to {workdir}/heldout_best/params as well as the last to {workdir}/params.
    c.rl.eval_every = 0
    c.rl.heldout_tasks = 0  # the first N held-out tasks (0 = all; toy: the number of test tasks, 0 = rl.toy.tasks)

    c.rl.rollout = ml_collections.ConfigDict()  # how episodes are sampled
    c.rl.rollout.temperature = 0.7  # recipe: T 0.7, top_p 1, no top_k
    c.rl.rollout.top_p = 1.0
    c.rl.rollout.top_k = 0
    c.rl.rollout.concurrency = 32  # episodes in flight
    c.rl.rollout.max_infra_retries = 2  # per episode; a group still missing a sample is re-queued whole

    c.rl.sync = ml_collections.ConfigDict()  # learner -> engine weight pushes (rl/policy_sync.py)
    c.rl.sync.every = 1  # push weights to the engine every N learner steps
    # Where pushes to a server (SGLang) are published; "" = /dev/shm/... when every engine.url is on
    # this host, else {workdir}/weights (`weight_sync.default_root`). The newest `keep` stay.
    c.rl.sync.weights_dir = ""
    c.rl.sync.keep = 3

    c.rl.loss = ml_collections.ConfigDict()  # the policy loss (rl/losses.py)
    c.rl.loss.eps_low = 0.2  # PPO clip (recipe: 0.2 / 0.28 clip-higher)
    c.rl.loss.eps_high = 0.28
    c.rl.loss.dual_clip = 0.0  # > 1 enables dual-clip (verl: 3.0)
    c.rl.loss.ratio_level = "token"  # token (PPO) | sequence (GSPO)
    c.rl.loss.agg_mode = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    c.rl.loss.kl_coef = 0.01  # recipe: k3 (low_var_kl) 0.01 to the SFT reference
    c.rl.loss.kl_type = "k3"  # k1 | k2 | k3
    c.rl.loss.reference = ""  # frozen KL reference weights; "" = model.init_from (the SFT checkpoint)
    c.rl.loss.entropy_coef = 0.001
    # Token truncated importance sampling: min(exp(learner − behaviour log-prob), cap); 0 = off.
    # -1 = by engine (`Engine.default_tis_cap`): 2.0 against SGLang, whose log-probs come from other
    # kernels than the learner's (the PPO ratio is then anchored on the learner's own recomputation
    # and TIS corrects the gap, as verl and slime do), off against the built-in engine.
    c.rl.loss.tis_cap = -1.0
    c.rl.loss.geo_mask_low = 0.0  # geometric sequence mask bounds (0 = off)
    c.rl.loss.geo_mask_high = 0.0
    c.rl.loss.veto_threshold = 0.0  # drop sequences with a token ratio below this (0 = off)

    c.rl.batch = ml_collections.ConfigDict()  # trajectories -> packed learner rows (rl/batch.py)
    c.rl.batch.max_len = 8192  # tokens per packed learner row; longer trajectories follow `overlong`
    c.rl.batch.overlong = "truncate"  # truncate | drop
    c.rl.batch.keep_length_cut = False  # train turns cut by max_new_tokens (masked by default)
    # Turns that failed to parse (kind "malformed"; their repair, if any, is never trained): "mask"
    # never trains them; "nonpositive" trains them only when their episode's advantage is negative,
    # so a malformed turn is only ever pushed down, never reinforced by an episode its repair won.
    c.rl.batch.malformed_turns = "mask"
    # Packed rows per data-parallel device per micro-batch: memory is bounded and the learner
    # compiles once (fixed-shape micro-batches, looped on the host) though a step's row count
    # follows its rollouts. 0 = one executable per row bucket, split into optim.grad_accum micro-batches.
    c.rl.batch.micro_batch_rows = 0
    c.rl.batch.vocab_chunk = 0  # learner log-probs: vocabulary block (0 = whole vocabulary)

    c.rl.toy = ml_collections.ConfigDict()  # rl.env="toy": the lookup game (env/toy.py)
    c.rl.toy.tasks = 16  # number of tasks
    c.rl.toy.shared_table = False  # one key -> value table for all tasks (memorisable)
    c.rl.toy.turn_latency_s = 0.0  # sleep per agent turn (models user/tool latency; benchmarks)

    # Stage pipeline (tau2jax/stages/pipeline.py): demos -> sft -> rft -> sft -> grpo, evals between them.
    # Every step starts from this whole config; these sub-configs (same keys as the config itself)
    # override it for one kind of step. `eval` applies to all four evals, so their numbers compare.
    c.pipeline = ml_collections.ConfigDict()
    c.pipeline.rft_mix_demos = True  # the second SFT trains on RFT's kept episodes and the gold demos
    # The train tasks demos, RFT and GRPO use (comma-separated ids, as tau2.task_ids); "" = the whole
    # train split. The evals keep tau2.task_ids / eval.max_tasks_per_domain on the configured split.
    c.pipeline.train_task_ids = ""
    for step in ("demos", "sft", "rft", "sft_rft", "grpo", "eval"):
        c.pipeline[step] = ml_collections.ConfigDict()

    c.lock()
    return c


# Keys the `rl` section had before it was split by concern -> where they live now.
MOVED = {f"rl.{old}": f"rl.{new}" for old, new in {
    "temperature": "rollout.temperature", "top_p": "rollout.top_p", "top_k": "rollout.top_k",
    "concurrency": "rollout.concurrency", "max_infra_retries": "rollout.max_infra_retries",
    "sync_every": "sync.every", "weights_dir": "sync.weights_dir", "weights_keep": "sync.keep",
    **{k: f"loss.{k}" for k in ("eps_low", "eps_high", "dual_clip", "ratio_level", "agg_mode", "kl_coef",
                                "kl_type", "reference", "entropy_coef", "tis_cap", "geo_mask_low", "geo_mask_high",
                                "veto_threshold")},
    **{k: f"batch.{k}" for k in ("max_len", "overlong", "keep_length_cut", "malformed_turns", "micro_batch_rows",
                                 "vocab_chunk")},
    "toy_tasks": "toy.tasks", "toy_shared_table": "toy.shared_table", "toy_turn_latency_s": "toy.turn_latency_s",
}.items()}  # fmt: skip


def moved_key(key: str) -> str | None:
    """The new name of an old config key (a pipeline override's too: `pipeline.grpo.rl.temperature`)."""
    for old, new in MOVED.items():
        if key == old or key.endswith("." + old):
            return key[: len(key) - len(old)] + new
    return None


def check_override_keys(argv, config: ml_collections.ConfigDict | None = None) -> None:
    """Raises ConfigError for a `--config.<key>=` override naming a key that moved, or (given the
    loaded `config`) a key it does not have, suggesting the nearest existing key."""
    keys = flat_keys(config) if config is not None else None
    for arg in argv:
        if arg.startswith("--config."):
            key = arg[len("--config."):].split("=", 1)[0]
            if (new := moved_key(key)) is not None:
                raise ConfigError(f"config.{key}: this key moved to config.{new} (the rl section is split by "
                                  f"concern: rl.rollout, rl.sync, rl.loss, rl.batch, rl.toy); use --config.{new}")
            if keys is not None and key not in keys:
                near = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
                raise ConfigError(f"config.{key}: no such config key; "
                                  + (f"did you mean --config.{near[0]}?" if near else
                                     "see tau2jax/config.py default_config() for the keys"))


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every dotted key of `config`, sections included (`optim`, `optim.lr`, ...)."""
    out = []
    for k, v in config.items():
        out.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            out += flat_keys(v, f"{prefix}{k}.")
    return out


def config_file_arg(argv) -> str | None:
    """The value of `--config FILE[:arg]` / `--config=FILE[:arg]` in argv, or None."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg[len("--config="):]
    return None


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`FILE[:arg]` -> `FILE.get_config([arg])`, as ml_collections' config flag loads it; a missing
    file or one without get_config is a ConfigError naming the path."""
    path, *arg = spec.split(":", 1)
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such config file; give a path such as configs/tiny_sft.py")
    module_spec = importlib.util.spec_from_file_location("_tau2jax_cli_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"--config {path}: the file defines no get_config(); see configs/tiny_sft.py")
    return module.get_config(*arg)


def redacted(c: ml_collections.ConfigDict) -> dict:
    """The config as a dict for reports, secrets (API keys) replaced."""
    d = c.to_dict()
    for section in ("user", "engine"):
        if d.get(section, {}).get("api_key") not in (None, "", "EMPTY"):
            d[section]["api_key"] = "<redacted>"
    return d


def csv(value: str) -> list[str]:
    """Split a comma-separated config string into its non-empty items."""
    return [v.strip() for v in value.split(",") if v.strip()]


def url_list(value: str, field: str) -> list[str]:
    """A comma-separated list of URLs (whitespace around each tolerated) -> the URLs; an empty entry
    (a stray comma) or an empty list is a ConfigError naming `config.<field>`."""
    urls = [v.strip() for v in value.split(",")]
    if not any(urls):
        raise ConfigError(f"config.{field}: no URL given; give one, or several comma-separated")
    if not all(urls):
        raise ConfigError(f"config.{field}: {value!r} has an empty entry (a stray comma?); "
                          "list the URLs comma-separated, none empty")
    return urls


def _require(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config.{field}: {msg}")


def validate(c: ml_collections.ConfigDict) -> None:
    """Reject values that are well-typed but cannot work, naming the field."""
    _require(c.stage in STAGES, "stage", f"{c.stage!r} is not one of {STAGES}")
    _require(bool(c.model.hf_dir or c.model.init_from) or c.model.name in known_sizes(), "model.name",
             f"unknown model size {c.model.name!r}; use one of {known_sizes()}, or model.hf_dir / model.init_from")
    if c.stage in ("sft", "grpo") and not c.model.init_from and not c.model.random_init:
        model = f"model.hf_dir's model ({c.model.hf_dir})" if c.model.hf_dir else f"model.name={c.model.name!r}"
        _require(not c.model.hf_dir and c.model.name in RANDOM_INIT_SIZES, "model.init_from",
                 f"not set, so {model} would train from random weights; convert the weights "
                 "(python -m checkpoints_tools.hf_to_orbax --hf-dir HF --out DIR) and pass "
                 "--config.model.init_from=DIR, or --config.model.random_init=True to mean it")
    _require(c.train.steps >= 0, "train.steps", f"{c.train.steps} is negative; use >= 1, or 0 to derive it "
             "from data.num_epochs")
    _require(c.model.remat in ("none", "full", "dots", "attn"), "model.remat", f"unknown policy {c.model.remat!r}")
    _require(c.model.attn_impl in ("xla", "flash", "cudnn"), "model.attn_impl", "must be 'xla', 'flash' or 'cudnn'")
    _require(c.model.attn_max_segments >= 1, "model.attn_max_segments", "must be >= 1")
    for dt in ("param_dtype", "compute_dtype"):
        _require(getattr(c.model, dt) in ("float32", "bfloat16"), f"model.{dt}", "must be float32 or bfloat16")
    for ax in ("data", "fsdp", "tensor"):
        v = getattr(c.mesh, ax)
        _require(v == -1 or v >= 1, f"mesh.{ax}", f"must be -1 or >= 1, got {v}")
    for path_field in ("model.hf_dir", "model.init_from", "tokenizer.path", "tau2.data_dir", "engine.checkpoint"):
        section, key = path_field.split(".")
        p = c[section][key]
        _require(not p or os.path.exists(p), path_field, f"path {p!r} does not exist")
    _require(c.data.overlong in ("truncate", "drop"), "data.overlong", "must be 'truncate' or 'drop'")
    _require(c.data.max_len > 0 and c.data.batch_size > 0, "data", "max_len and batch_size must be > 0")
    # the packed row length the stage trains on: SFT rows are data.max_len, GRPO rows rl.batch.max_len
    row_field = "rl.batch.max_len" if c.stage == "grpo" else "data.max_len"
    row_len = c.rl.batch.max_len if c.stage == "grpo" else c.data.max_len
    for field, chunk in (("train.loss_chunk", c.train.loss_chunk), ("model.attn_chunk", c.model.attn_chunk)):
        _require(chunk >= 0 and (chunk == 0 or chunk >= row_len or row_len % chunk == 0), field,
                 f"{chunk} must be 0 or divide {row_field} ({row_len}); a remainder would "
                 "silently fall back to the dense, unchunked memory peak")
    _require(c.optim.schedule in ("cosine", "constant"), "optim.schedule", f"unknown {c.optim.schedule!r}")
    _require(c.optim.grad_accum >= 1, "optim.grad_accum", "must be >= 1")
    _require(c.data.batch_size % c.optim.grad_accum == 0, "optim.grad_accum",
             f"must divide data.batch_size ({c.data.batch_size})")
    _require(c.tau2.prompt_style in PROMPT_STYLES, "tau2.prompt_style", f"must be one of {PROMPT_STYLES}")
    for d in csv(c.tau2.domains):
        _require(d in DOMAINS, "tau2.domains", f"unknown domain {d!r}; known: {DOMAINS}")
    _require(c.tau2.max_steps >= 1 and c.tau2.max_errors >= 1, "tau2", "max_steps and max_errors must be >= 1")
    _require(c.tau2.max_repairs >= 0, "tau2.max_repairs", "must be >= 0")
    _require(c.user.kind in ("scripted", "llm"), "user.kind", "must be 'scripted' or 'llm'")
    _require(c.user.timeout_s > 0, "user.timeout_s", "must be > 0")
    _require(c.user.max_retries >= 0 and c.user.retry_backoff_s >= 0, "user", "max_retries and retry_backoff_s must be >= 0")
    if c.user.kind == "llm":
        url_list(c.user.base_url, "user.base_url")
    _require(c.user.temperature >= 0.0, "user.temperature", "must be >= 0")
    _require(0.0 < c.user.top_p <= 1.0, "user.top_p", "must be in (0, 1]")
    _require(c.user.top_k == -1 or c.user.top_k >= 1, "user.top_k", "must be -1 (off) or >= 1")
    _require(0.0 <= c.user.min_p <= 1.0, "user.min_p", "must be in [0, 1]")
    _require(c.user.repetition_penalty > 0.0, "user.repetition_penalty", "must be > 0 (1 = off)")
    _require(c.user.max_tokens >= 1, "user.max_tokens", "must be >= 1")
    _require(c.engine.kind in ("builtin", "sglang", "gold"), "engine.kind", "must be builtin, sglang or gold")
    _require(c.engine.dtype in ("auto", "float32", "bfloat16"), "engine.dtype", "must be auto, float32 or bfloat16")
    _require(c.engine.scheduler in ("static", "continuous"), "engine.scheduler", "must be static or continuous")
    _require(c.engine.max_seq_len >= 2 and c.engine.max_batch >= 1, "engine",
             "max_seq_len must be >= 2 and max_batch >= 1")
    _require(c.engine.prefix_cache_tokens >= 0, "engine.prefix_cache_tokens", "must be >= 0 (0 = off)")
    _require(c.eval.num_samples >= 1, "eval.num_samples", "must be >= 1")
    _require(c.eval.concurrency >= 1, "eval.concurrency", "must be >= 1")
    _require(c.engine.concurrency >= 0, "engine.concurrency", "must be >= 0 (0 = the stage's concurrency)")
    _require(c.eval.max_infra_retries >= 0, "eval.max_infra_retries", "must be >= 0")
    _require(c.eval.max_tasks_per_domain >= 0, "eval.max_tasks_per_domain", "must be >= 0 (0 = all)")
    _require(c.eval.temperature >= 0.0, "eval.temperature", "must be >= 0")
    _require(0.0 < c.eval.top_p <= 1.0, "eval.top_p", "must be in (0, 1]")
    _require(c.rl.env in ("tau2", "toy"), "rl.env", "must be 'tau2' or 'toy'")
    _require(c.rl.steps >= 1 and c.rl.tasks_per_step >= 1 and c.rl.samples_per_task >= 1, "rl",
             "steps, tasks_per_step and samples_per_task must be >= 1")
    _require(c.rl.samples_per_task >= 2 or not c.rl.std_normalize, "rl.samples_per_task",
             "group advantages need >= 2 samples per task")
    _require(c.rl.batch.overlong in ("truncate", "drop"), "rl.batch.overlong", "must be 'truncate' or 'drop'")
    _require(c.rl.batch.malformed_turns in ("mask", "nonpositive"), "rl.batch.malformed_turns", "must be 'mask' or 'nonpositive'")
    _require(c.reward.wrong_call_penalty >= 0, "reward.wrong_call_penalty", "must be >= 0")
    _require(c.rl.sync.every >= 1, "rl.sync.every", "must be >= 1")
    _require(c.rl.rollout.concurrency >= 1, "rl.rollout.concurrency", "must be >= 1")
    _require(c.rl.sync.keep >= 1, "rl.sync.keep", "must be >= 1")
    _require(c.rl.max_empty_rounds >= 0, "rl.max_empty_rounds", "must be >= 0")
    _require(c.rl.max_staleness >= c.rl.sync.every - 1, "rl.max_staleness",
             f"must be >= rl.sync.every - 1 ({c.rl.sync.every - 1}): between syncs the engine serves a version "
             "that many steps old, and groups may only start within the staleness bound")
    _require(c.rl.stale_policy in ("drop", "correct"), "rl.stale_policy", "must be 'drop' or 'correct'")
    _require(c.rl.eval_every >= 0 and c.rl.heldout_tasks >= 0, "rl.eval_every", "eval_every and heldout_tasks must be >= 0")
    _require(c.rl.eval_every % c.rl.sync.every == 0, "rl.eval_every",
             f"must be a multiple of rl.sync.every ({c.rl.sync.every}): held-out episodes run on the weights just pushed")
    _require(c.rl.loss.tis_cap == -1 or c.rl.loss.tis_cap >= 0, "rl.loss.tis_cap", f"must be -1 (by engine) or >= 0, got {c.rl.loss.tis_cap}")
    _require(c.rl.toy.turn_latency_s >= 0, "rl.toy.turn_latency_s", "must be >= 0")
    _require(c.rl.loss.agg_mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"), "rl.loss.agg_mode",
             f"unknown {c.rl.loss.agg_mode!r}")
    _require(c.rl.loss.kl_type in ("k1", "k2", "k3"), "rl.loss.kl_type", f"unknown {c.rl.loss.kl_type!r}")
    _require(c.rl.loss.ratio_level in ("token", "sequence"), "rl.loss.ratio_level", "must be 'token' or 'sequence'")
    _require(c.rft.samples >= 1 and c.rft.concurrency >= 1, "rft", "samples and concurrency must be >= 1")
    _require(c.rft.max_infra_retries >= 0, "rft.max_infra_retries", "must be >= 0")
    _require(c.rft.temperature >= 0.0 and c.rft.top_k >= 0, "rft", "temperature and top_k must be >= 0")
    _require(0.0 < c.rft.top_p <= 1.0, "rft.top_p", "must be in (0, 1]")
    _require(0.0 <= c.rft.min_partial <= 1.0, "rft.min_partial", "must be in [0, 1] (partial rewards are)")
