"""RFT data for Qwen3-4B-Instruct-2507 after SFT, one 8×H100 node: the SFT policy served by
SGLang samples every tau2 train task, and the kept episodes become SFT token records.

    bash launch/gpu_node.sh ...                                  # policy on :30000, user simulator on :30001
    python -m tau2jax.train --config configs/qwen3_4b_rft.py \
        --config.model.hf_dir=/models/Qwen3-4B-Instruct-2507 --config.workdir=runs/qwen3_4b_rft \
        --config.rft.mix_files=runs/demos_native/airline.jsonl,runs/demos_native/retail.jsonl,runs/demos_native/telecom.jsonl
    # then SFT on {workdir}/rft/kept.jsonl (configs/qwen3_4b_sft.py, --config.data.train_files=...)

178 train tasks (airline 30, retail 74, telecom 74) × 8 samples = 1424 episodes; wall time not
measured yet. Rerunning the command resumes from {workdir}/rft/ledger.jsonl.
"""

from tau2jax.config import default_config


def get_config(arg: str = ""):
    c = default_config()
    c.stage = "rft"
    c.workdir = "runs/qwen3_4b_rft"

    c.tau2.domains = "airline,retail,telecom"
    c.tau2.split = "train"  # test tasks must never become training data
    c.tau2.max_steps = 100

    c.engine.kind = "sglang"  # the SFT checkpoint exported to HF and served on :30000
    c.engine.url = "http://127.0.0.1:30000"
    c.engine.max_new_tokens = 4096  # per turn, as the recipe trains (eval uses 1200)

    c.user.kind = "llm"  # Qwen3-4B-Instruct-2507 (thinking off) on :30001, as the recipe's local user
    c.user.base_url = "http://127.0.0.1:30001/v1"
    c.user.temperature = 0.7

    # Recipe: 8 samples per train task at T 0.8, top_p 1, no top_k. A task the policy solves with
    # probability p gets at least one success to keep with probability 1 - (1 - p)^8 (p = 0.2: 83%);
    # the partial fallback (>= 0.6) keeps a near-miss on the tasks with none.
    c.rft.samples = 8
    c.rft.temperature = 0.8
    c.rft.top_p = 1.0
    c.rft.top_k = 0
    c.rft.min_partial = 0.6
    # SGLang batches concurrent requests: 64 episodes keep the policy server busy while each waits
    # on its user simulator turn.
    c.rft.concurrency = 64
    c.rft.max_infra_retries = 2
    return c
