"""Qwen3 dense model sizes, and conversion to/from Hugging Face `config.json`.

Adding a size is adding a row to `_SIZES`; the numbers are the published HF configs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# The real Qwen3 tokenizer has 151669 ids; HF checkpoints pad the embedding to 151936.
QWEN3_TOKENIZER_VOCAB = 151669


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 40960

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig: num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SIZES: dict[str, dict[str, Any]] = {
    # CPU tests and demos: the real tokenizer's vocabulary, a few thousand non-embedding params.
    "tiny": dict(vocab_size=QWEN3_TOKENIZER_VOCAB, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e6, rms_norm_eps=1e-6,
                 tie_word_embeddings=True, max_position_embeddings=4096),
    # GRPO on CPU with env/toy.py: its 16-token vocabulary (toy.VOCAB_SIZE), the "tiny" body.
    "toy": dict(vocab_size=16, hidden_size=64, intermediate_size=128, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e6, rms_norm_eps=1e-6,
                tie_word_embeddings=True, max_position_embeddings=256),
    # Qwen/Qwen3-0.6B config.json
    "qwen3_0_6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28,
                       num_heads=16, num_kv_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, max_position_embeddings=40960),
    # Qwen/Qwen3-1.7B config.json
    "qwen3_1_7b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=28,
                       num_heads=16, num_kv_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, max_position_embeddings=40960),
    # Qwen/Qwen3-4B-Instruct-2507 config.json (256K context, rope_theta 5e6).
    "qwen3_4b": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_layers=36,
                     num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=5e6, rms_norm_eps=1e-6,
                     tie_word_embeddings=True, max_position_embeddings=262144),
}


def known_sizes() -> list[str]:
    return sorted(_SIZES)


def get_model_config(name: str, **overrides) -> ModelConfig:
    if name not in _SIZES:
        raise ValueError(f"unknown model size {name!r}; known sizes: {', '.join(known_sizes())}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"unknown ModelConfig field(s) {bad}; fields are {sorted(fields)}")
    return ModelConfig(**{**_SIZES[name], **overrides})


def _rope_theta(hf: dict) -> float:
    """rope_theta from either the classic keys (rope_theta + rope_scaling) or transformers>=5's
    `rope_parameters`; any scaling (YaRN, linear, …) is rejected because the model does not
    implement it."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    for spec in (params, scaling):
        if spec and spec.get("rope_type", spec.get("type", "default")) != "default":
            raise ValueError(f"HF config: rope scaling {spec} is not supported (only plain RoPE); "
                             "remove rope_scaling or use a model without it")
    if params and "rope_theta" in params:
        return float(params["rope_theta"])
    if "rope_theta" in hf:
        return float(hf["rope_theta"])
    return 10000.0  # transformers' default when the key is absent


def from_hf_config(path_or_dict: str | os.PathLike | dict) -> ModelConfig:
    """Read an HF Qwen3 config.json (a path to the file or its directory, or the parsed dict)."""
    if isinstance(path_or_dict, dict):
        hf = path_or_dict
    else:
        path = os.fspath(path_or_dict)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            hf = json.load(f)
    model_type = hf.get("model_type")
    if model_type != "qwen3":
        hint = " (MoE models are not supported)" if "moe" in str(model_type) else ""
        raise ValueError(f"HF config: model_type {model_type!r} is not supported{hint}; expected 'qwen3'")
    if hf.get("num_experts") or hf.get("num_local_experts"):
        raise ValueError("HF config: mixture-of-experts layers are not supported (dense Qwen3 only)")
    if hf.get("use_sliding_window"):
        raise ValueError("HF config: use_sliding_window=true is not supported (full attention only)")
    if hf.get("attention_bias"):
        raise ValueError("HF config: attention_bias=true is not supported (Qwen3 has no q/k/v bias)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"HF config: hidden_act {hf['hidden_act']!r} is not supported (silu only)")
    num_heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        rope_theta=_rope_theta(hf),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 40960),
    )


def to_hf_config(cfg: ModelConfig, dtype: str = "bfloat16") -> dict:
    """An HF config.json dict for `Qwen3ForCausalLM`. Writes both `rope_theta` (read by
    transformers<5 and SGLang) and `rope_parameters` (transformers>=5)."""
    hf = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_layers,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    # Qwen3's <|endoftext|> / <|im_end|>; left out for toy vocabularies that do not contain them.
    if cfg.vocab_size > 151645:
        hf.update(bos_token_id=151643, eos_token_id=151645)
    return hf


def num_params(cfg: ModelConfig, *, include_embedding: bool = True) -> int:
    """Parameter count; with include_embedding=False, the input embedding table is left out
    (an untied lm_head is always counted: it is a matmul)."""
    d, f, h, k, dh = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_layer = d * h * dh + 2 * d * k * dh + h * dh * d + 3 * d * f + 2 * d + 2 * dh
    n = cfg.num_layers * per_layer + d
    embed = cfg.vocab_size * d
    if not cfg.tie_word_embeddings:
        n += embed
    return n + (embed if include_embedding else 0)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token, PaLM-style: 6·N for the matmul weights
    (layers + lm head; the embedding gather is free) plus 12·L·H·Dh·T for QKᵀ and AV
    (full, not causal-halved, so MFU numbers compare with the usual convention)."""
    matmul_params = num_params(cfg, include_embedding=False)
    if cfg.tie_word_embeddings:
        matmul_params += cfg.vocab_size * cfg.hidden_size  # the tied head still multiplies
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    return 6.0 * matmul_params + attention
