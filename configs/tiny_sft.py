"""Tiny SFT on CPU: a 2-layer random Qwen3 (real Qwen3 tokenizer) learns a handful of tau2-style
conversations; the loss should fall below half its first value.

    python -m tau2jax.train --config configs/tiny_sft.py            # about a minute on 2 CPU cores
    python -m tau2jax.train --config configs/tiny_sft.py --config.workdir=/tmp/sft --config.train.steps=60
"""

from tau2jax.config import default_config


def get_config(arg: str = ""):
    c = default_config()
    c.stage = "sft"
    c.workdir = "runs/tiny_sft"
    c.model.name = "tiny"
    c.data.train_files = "data/tiny_sft.jsonl"
    c.data.max_len = 1408  # the longest conversation (1394 ids) fits whole
    c.data.batch_size = 2
    c.data.num_epochs = 100  # the pipeline repeats; train.steps bounds the run
    c.train.steps = 15
    c.train.checkpoint_every = 5
    c.train.loss_chunk = 128  # 151k-vocab logits a chunk at a time
    # A tiny random model needs a large step size to learn anything in 15 steps.
    c.optim.lr = 1e-2
    c.optim.warmup_frac = 0.1
    c.optim.weight_decay = 0.0
    return c
