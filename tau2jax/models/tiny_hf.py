"""A tiny random HF Qwen3 checkpoint, built offline: the fixture model of the demo, the GPU
rehearsal, the parity CLI, benchmarks and tests."""

from __future__ import annotations

import os

from tau2jax.models.configs import get_model_config, to_hf_config


def make_tiny_hf_dir(out_dir: str, *, tied: bool = True, vocab_size: int = 512, seed: int = 0,
                     dtype: str = "float32", max_shard_size: str | None = None,
                     config_name: str = "tiny", **overrides) -> str:
    """Saves a random transformers Qwen3ForCausalLM (safetensors) for
    `get_model_config(config_name, ...)` into `out_dir`. A small `max_shard_size` (e.g. "40KB")
    writes several shards plus model.safetensors.index.json."""
    import torch  # torch + transformers (heavy, optional): only building the HF fixture needs them
    import transformers

    cfg = get_model_config(config_name, vocab_size=vocab_size, tie_word_embeddings=tied, **overrides)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config.from_dict(to_hf_config(cfg)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # HF init sets every norm weight to 1, which would hide a swapped q_norm/k_norm or
        # attn/mlp norm; random norms and O(1) logits make parity and greedy match meaningful.
        for _, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_(1.0 + 0.1 * noise if p.ndim == 1 else 0.1 * noise)
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    if not any(n.endswith(".safetensors") for n in os.listdir(out_dir)):
        raise RuntimeError(f"save_pretrained wrote no safetensors into {out_dir}")
    return out_dir
