"""The train state pytree and how it is created and laid out on a mesh."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from tau2jax.models import qwen3


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def abstract_params(model_cfg, param_dtype: str):
    """The params' shapes and dtypes, nothing allocated."""
    return jax.eval_shape(lambda: qwen3.init_params(model_cfg, jax.random.key(0), dtype=jnp.dtype(param_dtype)))


def state_shardings(tx: optax.GradientTransformation, abstract_params, param_shardings, mesh) -> TrainState:
    """Shardings for every leaf: optimizer moments follow their parameter, scalars are replicated."""
    replicated = NamedSharding(mesh, P())
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt, param_shardings,
        transform_non_params=lambda _: replicated,
    )
    return TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings, rng=replicated)


def create_state(params, tx: optax.GradientTransformation, shardings: TrainState, seed: int) -> TrainState:
    """Build the state from (possibly sharded) params, placing every leaf where `shardings` says."""

    def init(p):
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                          rng=jax.random.key_data(jax.random.key(seed)))

    return jax.jit(init, out_shardings=shardings)(params)
