"""Gold demonstrations of the tau2 train tasks, as SFT JSONL (stage "demos").

    python -m tau2jax.train --config configs/demos.py           # native prompt style
    python -m tau2jax.train --config configs/demos.py:recipe    # the published checkpoints' style

Replays the expected actions of all 178 train tasks (airline 30, retail 74, telecom 74) through
the real environments with the scripted user and scores them with tau2's evaluator; CPU only,
about 3 minutes on 2 cores (airline dominates: its evaluator reloads the flight DB twice per task).
Writes {workdir}/{domain}.jsonl; the last stdout line reports replayed / reward_1 per domain.
"""

from tau2jax.config import default_config


def get_config(arg: str = "native"):
    c = default_config()
    c.stage = "demos"
    c.workdir = f"runs/demos_{arg}"

    c.tau2.domains = "airline,retail,telecom"
    c.tau2.split = "train"  # the stage refuses anything else: test tasks must not become SFT data
    c.tau2.prompt_style = arg  # "native" | "recipe"; the SFT data must match the style you train for

    c.engine.kind = "gold"  # the GoldEngine plays each task's expected actions
    c.engine.max_new_tokens = 4096  # a gold turn is never cut
    c.user.kind = "scripted"  # offline, deterministic; performs telecom's user-side actions
    return c
