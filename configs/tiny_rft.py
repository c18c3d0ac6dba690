"""RFT on CPU: the tiny SFT policy samples the mock train tasks (builtin engine, scripted user);
kept episodes become SFT token records in {workdir}/rft/kept.jsonl.

    python -m tau2jax.train --config configs/tiny_sft.py        # first: the policy (runs/tiny_sft/params)
    python -m tau2jax.train --config configs/tiny_rft.py        # a few minutes on 2 CPU cores
    python -m tau2jax.train --config configs/tiny_rft.py --config.engine.kind=gold   # every task kept, seconds

Rerunning resumes: tasks already in {workdir}/rft/ledger.jsonl are not played again.
"""

from tau2jax.config import default_config


def get_config(arg: str = ""):
    c = default_config()
    c.stage = "rft"
    c.workdir = "runs/tiny_rft"

    c.tau2.domains = "mock"  # 9 tasks, all in its train split
    c.tau2.split = "train"  # the stage refuses others: test tasks must not become training data
    c.tau2.max_steps = 8  # a tiny policy rarely ends on its own: keep its episodes short
    c.user.kind = "scripted"  # offline, deterministic

    c.engine.kind = "builtin"
    c.engine.checkpoint = "runs/tiny_sft/params"  # configs/tiny_sft.py's exported weights
    c.engine.max_seq_len = 4096  # the mock prompt is ~1k tokens; 8 short turns fit
    c.engine.max_new_tokens = 64  # an under-trained model runs to the limit: bound each turn
    c.engine.max_batch = 4

    c.rft.samples = 4  # fewer than the recipe's 8: CPU minutes, still more than one per task
    c.rft.concurrency = 4  # the engine batches concurrent episodes' turns
    return c
