"""The demo's pipeline (`tau2jax.demo_config`) on a generated task family with a train/test split
(`tau2jax.env.task_family`): demos, RFT and GRPO use the family's train tasks, every eval (and
GRPO's in-loop held-out eval) its test tasks, combinations of slot values never trained.

    python -m tau2jax.env.task_family runs/family_data
    python -m tau2jax.train --config configs/tiny_pipeline_family.py --config.tau2.data_dir=runs/family_data \\
        --config.model.init_from=ORBAX_DIR          # a converted tiny model (benchmarks/heldout.py makes one)

The `tiny` Qwen3 (hidden 64, 2 layers, the real tokenizer). benchmarks/heldout.py runs it per seed.
"""

from tau2jax.demo_config import tiny_pipeline_config


def get_config(arg: str = ""):
    if arg:
        raise ValueError(f"configs/tiny_pipeline_family.py takes no arg, got {arg!r}")
    c = tiny_pipeline_config()
    c.workdir = "runs/tiny_pipeline_family"
    c.pipeline.train_task_ids = ""  # the family's train split (demos, RFT and GRPO run on split "train")
    c.tau2.split = "test"  # evals: the held-out combinations
    # 150 cosine steps at the demo's lr 1e-2: seed 0 copies both slots on about half the train tasks
    # (greedy pass@1 0.45, held-out 0.2), past the 0.3 gate with room for RL; 300 steps solve every
    # task, held-out ones too, leaving RL nothing to show (tau2jax/env/task_family.py has the runs).
    c.pipeline.sft.train.steps = 150
    c.pipeline.grpo.rl.tasks_per_step = 6
    c.pipeline.grpo.rl.eval_every = 5  # held-out greedy + sampled pass@1 in the loop (plotted in the report)
    return c
