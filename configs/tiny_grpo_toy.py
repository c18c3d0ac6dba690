"""GRPO on the toy lookup game (tau2jax/env/toy.py) with a random "toy" Qwen3, on CPU.

    python -m tau2jax.train --config configs/tiny_grpo_toy.py

No tokenizer, no user simulator, no SFT: a random policy over the 16-token vocabulary already wins
a few percent of episodes, so group advantages have signal from the first step. The last stdout line
is JSON with `first_reward` and `final_reward` (mean task reward over the first / last 3 steps).
About a minute on 2 cores; `tests/test_grpo.py::test_toy_grpo_raises_reward` asserts a gain >= 0.3.

One key -> value table for every task (`rl.toy.shared_table`): the answer can be learnt per key
or read from the lookup tool. With a table per task (`--config.rl.toy.shared_table=False`) the
value is only in the tool result and the model must learn to copy it: harder, and not learnt
reliably in a CI-sized run.

    python -m tau2jax.train --config configs/tiny_grpo_toy.py:heldout --config.model.init_from=SFT/params

`:heldout`: a table per task, 64 train tables, GRPO from a short gold SFT (configs/tiny_sft_toy.py)
with held-out pass@1 on 64 test tables every 10 steps (benchmarks/heldout.py). A lower learning
rate than from random: at 3e-3 the noisy policy gradient walks an SFT start off its lookups
(held-out pass@1 fell to 0 within 100 steps, seed 0); 1e-3 sharpens it.
"""

from tau2jax.config import default_config


def get_config(arg: str = ""):
    c = default_config()
    c.stage = "grpo"
    c.workdir = "runs/tiny_grpo_toy"
    c.model.name = "toy"
    c.mesh.data = 1  # one device: the step is tiny, collectives would only add latency

    c.rl.env = "toy"
    c.rl.toy.tasks = 16
    c.rl.toy.shared_table = True
    c.rl.steps = 40
    c.rl.tasks_per_step = 8
    c.rl.samples_per_task = 8  # more samples per group: more groups with a success early on
    c.rl.rollout.temperature = 1.0
    c.rl.rollout.concurrency = 16
    c.rl.batch.max_len = 64  # episodes are ~12 tokens
    # Every toy action is one token sampled with max_new_tokens=1, so the engine reports each turn as
    # cut by the length limit; here that is the complete action, and it must be trained.
    c.rl.batch.keep_length_cut = True
    # A malformed toy action ends its episode at reward 0, so its advantage is never positive:
    # training it pushes the random start off malformed tokens.
    c.rl.batch.malformed_turns = "nonpositive"
    c.rl.loss.kl_coef = 0.0  # nothing to stay close to: the start is random
    c.rl.loss.entropy_coef = 0.0

    c.engine.kind = "builtin"
    c.engine.max_seq_len = 64
    c.engine.max_batch = 64
    c.engine.max_new_tokens = 1  # every toy action is one token

    # A small model learning a 16-token game: a large constant learning rate is stable here.
    c.optim.lr = 3e-3
    c.optim.schedule = "constant"
    c.optim.warmup_frac = 0.0
    c.optim.weight_decay = 0.0
    c.train.checkpoint_every = 10
    if arg == "heldout":
        c.workdir = "runs/tiny_grpo_toy_heldout"
        c.rl.toy.shared_table = False
        c.rl.toy.tasks = 64
        c.rl.steps = 150
        c.rl.eval_every = 10
        c.rl.heldout_tasks = 64
        c.optim.lr = 1e-3
    elif arg:
        raise ValueError(f"configs/tiny_grpo_toy.py takes '' or 'heldout', got {arg!r}")
    return c
