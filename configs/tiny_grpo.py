"""GRPO on tau2's mock domain on CPU: the tiny model, the scripted user, the built-in engine, from an
under-trained SFT checkpoint (so its episodes sometimes succeed and groups have reward variance).

    python -m tau2jax.train --config configs/demos.py --config.tau2.domains=mock --config.workdir=runs/mock_demos
    python -m tau2jax.train --config configs/tiny_sft.py --config.workdir=runs/mock_sft \
        --config.data.train_files=runs/mock_demos/mock.jsonl --config.data.max_len=1024 --config.train.steps=100
    python -m tau2jax.train --config configs/tiny_grpo.py --config.model.init_from=runs/mock_sft/params

The mock domain has 9 tasks and no splits: GRPO trains on all of them (`create_task_1_nl_eval` is
passed by a do-nothing agent; read its success apart). Measured margins: WORKSPACE.md.
"""

from tau2jax.config import default_config


def get_config(arg: str = ""):
    c = default_config()
    c.stage = "grpo"
    c.workdir = "runs/tiny_grpo"
    c.model.name = "tiny"
    c.mesh.data = 1

    c.tau2.domains = "mock"
    c.tau2.split = "train"
    c.tau2.max_steps = 12  # mock tasks need 1-2 tool calls; a short cap keeps CPU episodes short
    c.tau2.max_repairs = 1
    c.user.kind = "scripted"

    c.engine.kind = "builtin"
    c.engine.max_seq_len = 2048
    c.engine.max_batch = 32
    c.engine.max_new_tokens = 48  # a mock tool call is ~30 tokens

    c.rl.env = "tau2"
    c.rl.steps = 20
    c.rl.tasks_per_step = 9
    c.rl.samples_per_task = 4
    c.rl.rollout.temperature = 1.0
    c.rl.rollout.concurrency = 36
    c.rl.batch.max_len = 2048
    c.rl.loss.kl_coef = 0.0  # a tiny model, a few steps: the reference term only slows learning here
    c.rl.loss.entropy_coef = 0.0
    c.train.loss_chunk = 256  # 151k-vocabulary logits a chunk at a time
    c.rl.batch.micro_batch_rows = 2  # [2, 256, 151k] logits at a time; a step's rows vary with its episodes
    c.train.checkpoint_every = 5

    c.optim.lr = 1e-3
    c.optim.schedule = "constant"
    c.optim.warmup_frac = 0.0
    c.optim.weight_decay = 0.0
    if arg:
        raise ValueError(f"configs/tiny_grpo.py takes no arg, got {arg!r}")
    return c
