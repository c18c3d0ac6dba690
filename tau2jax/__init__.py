"""tau2jax: SFT → RFT → GRPO for multi-turn tool-use agents on tau2-bench, in JAX/Flax."""

__version__ = "0.1.0"
