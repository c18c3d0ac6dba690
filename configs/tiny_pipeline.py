"""The whole recipe on CPU: demos -> SFT -> eval -> RFT -> SFT -> eval -> GRPO -> eval (+ the base
model's eval) with the `tiny` Qwen3 (hidden 64, 2 layers, the real 151k vocabulary) on tau2 mock.

    python -m tau2jax.demo                     # converts a random tiny HF model, then runs this
    python -m tau2jax.train --config configs/tiny_pipeline.py --config.model.init_from=ORBAX_DIR

Mock has 9 tasks and no train/test split: every step trains and evaluates on the same 9 tasks
(the report says so); `create_task_1_nl_eval` is passed by a do-nothing agent, and the gold agent
itself fails `update_task_with_history_and_env_assertions`, so 7 of the 8 tasks beyond the floor
can be learnt. Evals are greedy (T=0): with a deterministic scripted user every sample of a task
is the same episode, so one sample per task measures it (Pass@k = Pass@1 = pass^k).
"""

import ml_collections

from tau2jax.config import default_config


def get_config(arg: str = ""):
    c = default_config()
    c.stage = "pipeline"
    c.workdir = "runs/tiny_pipeline"
    c.model.name = "tiny"
    c.mesh.data = 1  # one device: collectives would only add latency to a tiny model

    c.tau2.domains = "mock"
    c.tau2.split = "test"  # evals; the training steps use "train" (mock: the same 9 tasks)
    c.tau2.max_steps = 8  # mock tasks need 1-2 tool calls and a reply
    c.tau2.max_repairs = 0  # a tiny model's malformed turn is an error, not 48 more tokens
    c.user.kind = "scripted"

    c.engine.kind = "builtin"
    c.engine.max_seq_len = 2048  # the mock prompt is ~700 tokens; 8 short turns fit
    c.engine.max_batch = 36
    c.engine.max_new_tokens = 48  # a mock tool call is ~30 tokens

    # Only ~5% of a mock conversation's tokens carry loss; length chunks without any skip the
    # 151k-vocabulary head, which is ~98% of this model's FLOPs.
    c.train.loss_chunk = 64
    c.train.checkpoint_every = 50
    c.optim.weight_decay = 0.0

    c.eval.num_samples = 1
    c.eval.temperature = 0.0
    c.eval.concurrency = 9

    # SFT on the 8 gold demos: one ~800-token conversation per 1024-token row; a tiny random model
    # needs a large step size.
    c.pipeline.sft = ml_collections.ConfigDict({
        "data": {"max_len": 1024, "batch_size": 2, "num_epochs": 1000},
        "train": {"steps": 120},  # loss 12.3 -> ~0.01; greedy eval then passes 6 of the 8 tasks beyond the floor
        "optim": {"lr": 1e-2, "warmup_frac": 0.1},
    })
    # RFT: 4 samples per task at the recipe's T=0.8; kept episodes + the demos.
    c.pipeline.rft = ml_collections.ConfigDict({"rft": {"samples": 4, "concurrency": 36}})
    c.pipeline.sft_rft = ml_collections.ConfigDict({
        "data": {"max_len": 1024, "batch_size": 2, "num_epochs": 1000},
        "train": {"steps": 20},
        "optim": {"lr": 1e-3, "warmup_frac": 0.1},
    })
    # GRPO: all 9 tasks x 4 samples per step. Groups without reward variance teach nothing: dropped
    # (dynamic sampling, no refill), so the learner only sees the tasks the policy sometimes fails.
    # 1024-token rows keep the dense attention's [rows, heads, T, T] scores small.
    c.pipeline.grpo = ml_collections.ConfigDict({
        "rl": {"steps": 3, "tasks_per_step": 9, "samples_per_task": 4, "temperature": 1.0, "concurrency": 36,
               "max_len": 1024, "dynamic_sampling": True, "max_refill_rounds": 0, "kl_coef": 0.0,
               "entropy_coef": 0.0},
        "optim": {"lr": 1e-4, "schedule": "constant", "warmup_frac": 0.0},
        "train": {"checkpoint_every": 2},
    })
    if arg:
        raise ValueError(f"configs/tiny_pipeline.py takes no arg, got {arg!r}")
    return c
