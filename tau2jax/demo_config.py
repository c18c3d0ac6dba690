"""The demo's pipeline config (`python -m tau2jax.demo` runs it; `configs/tiny_pipeline.py` gives it
to the CLI). The whole recipe on CPU: demos -> SFT -> eval -> RFT -> SFT -> eval -> GRPO -> eval
(+ the base model's eval) with the `tiny` Qwen3 (hidden 64, 2 layers, the real 151k vocabulary) on
tau2 mock.

    python -m tau2jax.demo                     # converts a random tiny HF model, then runs this
    python -m tau2jax.train --config configs/tiny_pipeline.py --config.model.init_from=ORBAX_DIR

Mock has 9 tasks and no train/test split: the evals score all 9, and the training steps (demos,
RFT, GRPO) use the 7 of them that can be learnt and that a do-nothing agent fails
(`pipeline.train_task_ids`): `create_task_1_nl_eval` is passed by a do-nothing agent and the gold
agent itself fails `update_task_with_history_and_env_assertions`. Evaluated tasks were trained on:
these numbers measure fitting, not generalisation (the report says so). Evals are greedy (T=0): with
a deterministic scripted user every sample of a task is the same episode, so one sample per task
measures it (Pass@k = Pass@1 = pass^k).

Each stage leaves room for the next: SFT stops early (58 steps: 3 of the 8 tasks beyond the floor),
RFT fine-tunes on its successes and the demos (4 of 8), GRPO samples 8 episodes per task so most
groups carry reward variance, and learns to copy the task id the user names (5 of 8; measured in
benchmarks/results/demo/; per seed: benchmarks/grpo_mock.py).
"""

from __future__ import annotations

import ml_collections

from tau2jax.config import default_config


def tiny_pipeline_config() -> ml_collections.ConfigDict:
    """The demo's pipeline config (`configs/tiny_pipeline.py` returns it)."""
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

    # the built-in engine; the mock prompt is ~700 tokens (8 short turns fit in 2048), a mock tool
    # call ~30 tokens
    c.engine.max_seq_len, c.engine.max_batch, c.engine.max_new_tokens = 2048, 36, 48  # kind: builtin, the default

    # Only ~5% of a mock conversation's tokens carry loss; length chunks without any skip the
    # 151k-vocabulary head, which is ~98% of this model's FLOPs.
    c.train.loss_chunk = 64
    c.train.checkpoint_every = 50
    c.optim.weight_decay = 0.0

    c.eval.num_samples = 1
    c.eval.temperature = 0.0
    c.eval.concurrency = 9

    c.pipeline.train_task_ids = ",".join((
        "create_task_1", "create_task_1_with_env_assertions", "update_task_1", "update_task_with_message_history",
        "update_task_with_initialization_data", "update_task_with_initialization_actions", "impossible_task_1"))

    # SFT on the 7 gold demos: one ~800-token conversation per 1024-token row; a tiny random model
    # needs a large step size. Greedy passes 0 of 8 after 50 steps, 3 after 58, 6 after 80 (its ceiling is 7):
    # 58 is a warm start that leaves room.
    c.pipeline.sft = ml_collections.ConfigDict({
        "data": {"max_len": 1024, "batch_size": 2, "num_epochs": 1000},
        "train": {"steps": 58},
        "optim": {"lr": 1e-2, "warmup_frac": 0.1},
    })
    # RFT: 8 samples per task at the recipe's T=0.8; kept episodes (successes) + the demos.
    c.pipeline.rft = ml_collections.ConfigDict({"rft": {"samples": 8, "concurrency": 36}})
    c.pipeline.sft_rft = ml_collections.ConfigDict({
        "data": {"max_len": 1024, "batch_size": 2, "num_epochs": 1000},
        "train": {"steps": 20},
        "optim": {"lr": 1e-3, "warmup_frac": 0.1},
    })
    # GRPO: the 7 train tasks x 8 samples per step at T=1, so most groups have a success and a failure.
    # Groups without reward variance teach nothing: dropped (dynamic sampling, no refill). lr 1e-3
    # collapsed rollout success within a step (0.39 -> 0.23); 3e-4 raises it (0.27 -> 0.36 in 10 steps).
    # Fixed 2-row micro-batches compile the learner once (rows vary with the episodes kept).
    # 1024-token rows keep the dense attention's [rows, heads, T, T] scores small.
    c.pipeline.grpo = ml_collections.ConfigDict({
        "rl": {"steps": 10, "tasks_per_step": 7, "samples_per_task": 8, "dynamic_sampling": True,
               "max_refill_rounds": 0, "rollout": {"temperature": 1.0, "concurrency": 36},
               "loss": {"kl_coef": 0.0, "entropy_coef": 0.0}, "batch": {"max_len": 1024, "micro_batch_rows": 2}},
        "optim": {"lr": 3e-4, "schedule": "constant", "warmup_frac": 0.0},
        "train": {"checkpoint_every": 5},
    })
    return c
