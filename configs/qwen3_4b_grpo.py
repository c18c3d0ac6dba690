"""GRPO of Qwen3-4B-Instruct-2507 on tau2 train tasks, one 8×H100 node with SGLang.

    bash launch/gpu_node.sh     # policy SGLang on :30000, user simulator on :30001 (see the script)
    python -m tau2jax.train --config configs/qwen3_4b_grpo.py \
        --config.model.hf_dir=/models/Qwen3-4B-Instruct-2507 --config.model.init_from=runs/qwen3_4b_rft_sft/params

Hyperparameters are the recipe's GRPO (shared/recipe-facts.md): 200 steps of 16 tasks × 4 samples =
64 trajectories per optimizer step, rollout T 0.7 / top_p 1 / no top_k, Adam lr 1e-6 constant, no
warmup, weight decay 0.1, betas (0.9, 0.98), PPO clip 0.2 / 0.28, k3 KL 0.01 to the SFT reference,
entropy 0.001, checkpoint every 10 steps. The recipe reports ~2 h on 8×H100.
"""

from tau2jax.config import default_config


def get_config(arg: str = ""):
    c = default_config()
    c.stage = "grpo"
    c.workdir = "runs/qwen3_4b_grpo"
    c.model.name = "qwen3_4b"
    c.model.param_dtype = "float32"
    c.model.compute_dtype = "bfloat16"
    c.model.remat = "full"
    c.model.attn_impl = "cudnn"  # see qwen3_4b_sft.py
    c.model.attn_max_segments = 32
    c.mesh.data = 1
    c.mesh.fsdp = -1  # every trainer GPU (gpu_node.sh: TRAIN_GPUS): fp32 masters + Adam (48 GB) sharded; the reference too
    c.mesh.tensor = 1

    c.tau2.domains = "airline,retail,telecom"
    c.tau2.split = "train"
    c.tau2.prompt_style = "native"  # must match the SFT data's style
    c.tau2.max_steps = 100
    c.user.kind = "llm"  # Qwen3-4B-Instruct-2507 on :30001, thinking off (launch/gpu_node.sh)
    c.user.temperature = 0.7

    c.engine.kind = "sglang"
    c.engine.url = "http://127.0.0.1:30000"
    c.engine.max_new_tokens = 4096  # per turn in training (recipe)

    c.reward.preset = "recipe_code"  # what the recipe's code trains with (0.5/0.35/0.15, alpha 0.25 per domain)

    c.rl.env = "tau2"
    c.rl.steps = 200
    c.rl.tasks_per_step = 16
    c.rl.samples_per_task = 4
    c.rl.rollout.temperature = 0.7
    c.rl.rollout.top_p = 1.0
    c.rl.rollout.top_k = 0
    c.rl.rollout.concurrency = 64  # every episode of a step in flight: SGLang batches them
    c.rl.batch.max_len = 16384  # packed rows; tau2 conversations run ~6-12k tokens
    c.rl.loss.eps_low, c.rl.loss.eps_high = 0.2, 0.28
    c.rl.loss.kl_coef, c.rl.loss.kl_type = 0.01, "k3"
    c.rl.loss.entropy_coef = 0.001
    c.rl.batch.vocab_chunk = 151936 // 8  # learner log-probs a vocabulary block at a time
    c.train.loss_chunk = 1024
    c.train.checkpoint_every = 10
    # Held-out pass@1 (greedy and sampled) on the test split (100 tasks, never trained on) every 20
    # steps, about the rollouts of three training steps; the best greedy pass@1's weights are
    # exported to {workdir}/heldout_best/params beside the last.
    c.rl.eval_every = 20
    c.rl.heldout_tasks = 0

    c.optim.lr = 1e-6
    c.optim.schedule = "constant"
    c.optim.warmup_frac = 0.0
    c.optim.weight_decay = 0.1
    c.optim.b1, c.optim.b2 = 0.9, 0.98
    c.optim.clip_norm = 1.0
    # 64 trajectories ≈ 32 packed rows of 16k: micro-batches of one row per GPU (~4 a step); the
    # learner compiles once whatever a step's row count.
    c.rl.batch.micro_batch_rows = 1
    if arg:
        raise ValueError(f"configs/qwen3_4b_grpo.py takes no arg, got {arg!r}")
    return c
