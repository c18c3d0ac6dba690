"""Mesh + logical-axis sharding on 8 fake CPU devices (conftest sets XLA_FLAGS)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tau2jax.models import configs, qwen3
from tau2jax.parallel import sharding


def test_make_mesh_shapes_and_errors():
    assert dict(sharding.make_mesh(data=-1, fsdp=2, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="8 devices"):
        sharding.make_mesh(data=3, fsdp=1, tensor=2)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.make_mesh(data=-1, fsdp=3)
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh(data=-1, fsdp=-1)


def test_logical_rules_and_fallback():
    assert sharding.logical_to_pspec(("batch", "length")) == P(("data", "fsdp"), None)
    assert sharding.logical_to_pspec(("layers", "embed", "heads", "head_dim")) == P(None, "fsdp", "tensor", None)
    with pytest.raises(KeyError, match="no sharding rule"):
        sharding.logical_to_pspec(("bogus",))
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    # 2 KV heads cannot be split 4 ways: that dimension is replicated, the rest stays sharded.
    cfg = configs.get_model_config("tiny", vocab_size=512)
    specs = jax.tree.map(lambda s: s.spec, qwen3.param_shardings(cfg, mesh))
    assert specs["layers"]["k_proj"] == P(None, "fsdp", None, None)
    assert specs["layers"]["q_proj"] == P(None, "fsdp", "tensor", None)
    assert specs["embed"] == P("tensor", "fsdp")


@pytest.mark.parametrize("tied", [True, False])
def test_sharded_forward_matches_single_device(tied):
    cfg = configs.get_model_config("tiny", vocab_size=512, tie_word_embeddings=tied)
    params = qwen3.init_params(cfg, jax.random.key(0))
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, cfg.vocab_size, (4, 16)).astype(np.int32)
    positions = np.broadcast_to(np.arange(16, dtype=np.int32), (4, 16))
    segs = np.ones((4, 16), np.int32)
    fwd = functools.partial(qwen3.forward, cfg=cfg)
    ref = np.asarray(jax.jit(fwd)(params, tokens=tokens, positions=positions, segment_ids=segs))

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    p_shard = qwen3.param_shardings(cfg, mesh)
    params_s = jax.device_put(params, p_shard)
    assert params_s["layers"]["gate_proj"].sharding.spec == P(None, "fsdp", "tensor")
    b_shard = sharding.batch_sharding(mesh)
    batch = [jax.device_put(x, b_shard) for x in (tokens, positions, segs)]
    with jax.set_mesh(mesh):  # activates the model's activation sharding constraints
        out = jax.jit(lambda p, t, pos, s: fwd(p, tokens=t, positions=pos, segment_ids=s),
                      in_shardings=(p_shard, b_shard, b_shard, b_shard))(params_s, *batch)
    assert out.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)


def test_constrain_is_noop_without_mesh():
    x = jnp.ones((4, 8))
    assert sharding.constrain(x, ("batch", None)) is x
