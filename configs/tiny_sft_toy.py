"""Gold SFT on the toy lookup game (tau2jax/env/toy.py), CPU: the "toy" Qwen3 (its 16-token
vocabulary, no tokenizer) on token records written by `toy.gold_record` (look the key up, copy the
value), e.g. of the train tables of `ToyEnvironment(shared_table=False)`:

    python -m tau2jax.train --config configs/tiny_sft_toy.py --config.data.train_files=gold.jsonl

Deliberately short (`train.steps`): benchmarks/heldout.py wants a policy that has partly learnt
lookup-then-copy, so that GRPO (configs/tiny_grpo_toy.py from its params) has something to sharpen.
"""

from tau2jax.config import default_config


def get_config(arg: str = ""):
    c = default_config()
    c.stage = "sft"
    c.workdir = "runs/tiny_sft_toy"
    c.model.name = "toy"
    c.mesh.data = 1
    c.data.max_len = 48  # a gold episode is 12 ids: 4 per packed row
    c.data.batch_size = 4
    c.data.num_epochs = 100  # the pipeline repeats; train.steps bounds the run
    c.train.steps = 8
    c.train.checkpoint_every = 100
    c.optim.lr = 3e-3
    c.optim.schedule = "constant"
    c.optim.warmup_frac = 0.0
    c.optim.weight_decay = 0.0
    if arg:
        raise ValueError(f"configs/tiny_sft_toy.py takes no arg, got {arg!r}")
    return c
