"""Which model a run trains and where its first weights come from (random, or a converted HF checkpoint)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from tau2jax import config as config_lib
from tau2jax.models import configs as model_configs
from tau2jax.models import qwen3


def resolve_model_config(config, tokenizer=None) -> model_configs.ModelConfig:
    """model.init_from's model_config.json wins, then model.hf_dir's config.json, then model.name."""
    if config.model.init_from:
        path = os.path.join(config.model.init_from, "model_config.json")
        if not os.path.exists(path):
            raise config_lib.ConfigError(
                f"config.model.init_from: {config.model.init_from!r} has no model_config.json; "
                "convert HF weights with `python -m checkpoints_tools.hf_to_orbax`")
        with open(path) as f:
            cfg = model_configs.ModelConfig(**json.load(f))
    elif config.model.hf_dir:
        cfg = model_configs.from_hf_config(os.path.join(config.model.hf_dir, "config.json"))
    else:
        cfg = model_configs.get_model_config(config.model.name)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise config_lib.ConfigError(
            f"config.model: vocab_size {cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    return cfg


def abstract_params(model_cfg, param_dtype: str):
    return jax.eval_shape(lambda: qwen3.init_params(model_cfg, jax.random.key(0), dtype=jnp.dtype(param_dtype)))


def initial_params(config, model_cfg, mesh, param_shardings):
    """Random init directly into the sharded layout, or the converted checkpoint restored onto the mesh."""
    dtype = jnp.dtype(config.model.param_dtype)
    if config.model.init_from:
        from tau2jax.weights.orbax_params import restore_params

        params, _ = restore_params(config.model.init_from, mesh=mesh)
        return jax.tree.map(lambda x: x.astype(dtype), params)
    init = jax.jit(lambda key: qwen3.init_params(model_cfg, key, dtype=dtype), out_shardings=param_shardings)
    return init(jax.random.key(config.seed))
