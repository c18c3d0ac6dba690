"""Pass@k evaluation on the tau2-bench test split with the recipe's settings.

Policy served by SGLang on :30000, LLM user simulator (Qwen3-4B-Instruct-2507, thinking off) on
:30001 — about 2 h for 100 tasks × 4 samples on 2×H100 in the recipe's sequential eval; episodes
run concurrently here:

    python -m tau2jax.train --config configs/eval.py \
        --config.engine.kind=sglang --config.engine.url=http://127.0.0.1:30000 \
        --config.workdir=runs/eval_grpo

Writes runs/…/eval/{trajectories.jsonl, summary.json, summary.md, pass_at_k.png}; rerunning the
same command resumes (finished episodes are kept, infrastructure failures are tried again; any
changed setting or served weight version is refused). Beside Pass@k the reports give the
do-nothing floor (tasks tau2 passes for an agent that only apologises: test 6/20 airline, 2/40
retail, 0/40 telecom) and Pass@k over the tasks it fails; the floor's first run plays ~100 null
episodes, later runs read ~/.cache/tau2jax/floor (eval.floor=False skips it).
For the published checkpoints add --config.tau2.prompt_style=recipe (the prompt they were
trained with); the user simulator the recipe reports is gpt-4.1-mini:
--config.user.model=gpt-4.1-mini --config.user.base_url=https://api.openai.com/v1 --config.user.api_key=$KEY
--config.user.sglang_params=False (OpenAI refuses SGLang's top_k/min_p/repetition_penalty fields).

CPU smoke run (gold engine replays each task's reference actions, scripted user): tau2's
leaderboard task set, the whole `base` split of the three domains (50 + 114 + 114 tasks), one
trial, about 2 minutes on 2 idle cores (plus ~2 minutes for the floor's first run); every task
passes. It writes
tau2's own files beside ours: eval/trajectories/<domain>.json (tau2 Results) and
eval/submission.json, which `tau2 submit validate runs/eval_gold/eval` accepts:

    python -m tau2jax.train --config configs/eval.py:gold

(--config.tau2.split=test --config.eval.max_tasks_per_domain=2 --config.eval.num_samples=2: a
15-second run.)
"""

from tau2jax.config import default_config


def get_config(arg: str = ""):
    c = default_config()
    c.stage = "eval"
    c.workdir = "runs/eval"

    c.tau2.domains = "airline,retail,telecom"
    c.tau2.split = "test"  # airline 20, retail 40, telecom 40 tasks
    c.tau2.max_steps = 100

    c.engine.kind = "sglang"
    c.engine.max_new_tokens = 1200  # per turn, as the recipe's eval

    # Recipe: 4 samples per task at T=0.8, top_p 1.0, top_k 20; Pass@1 = sample 0, Pass@4 = any.
    c.eval.num_samples = 4
    c.eval.temperature = 0.8
    c.eval.top_p = 1.0
    c.eval.top_k = 20
    # SGLang batches concurrent requests; 32 episodes in flight keep both servers busy without
    # queueing user-simulator calls past their timeout.
    c.eval.concurrency = 32
    c.eval.max_infra_retries = 2

    c.user.kind = "llm"
    c.user.model = "openai/qwen3-4b"  # whatever name the :30001 server registered
    c.user.base_url = "http://127.0.0.1:30001/v1"
    c.user.temperature = 0.7

    if arg in ("gold", "tiny"):
        c.workdir = "runs/eval_gold"
        c.engine.kind = "gold"
        c.user.kind = "scripted"
        c.tau2.split = "base"  # what tau2's leaderboard scores (`tau2 submit verify-trajs` wants every task)
        c.eval.num_samples = 1  # gold replays are deterministic: more trials would repeat the first
        c.eval.concurrency = 2  # 2 CPU cores
    elif arg:
        raise ValueError(f"configs/eval.py: unknown arg {arg!r}; use '' or 'gold' (alias 'tiny')")
    return c
