"""Weight sync from the learner to the rollout engine: how long the engine pauses, how long the
transfer takes, for both paths the RL loop uses.

    python benchmarks/weight_sync.py --quick              # tiny model, CPU (checks the paths)
    python benchmarks/weight_sync.py --model qwen3_4b      # GPU: Qwen3-4B-shaped weights

- in-process (built-in engine): the learner's fp32 params handed to `JaxEngine.update_weights`
  (cast to the engine's dtype and copied on device); the engine is paused for the whole call.
- disk (SGLang's path): `weight_sync.publish` (gather, bf16 safetensors, fsync, atomic rename) is
  the transfer, during which rollouts go on; the pause is the engine reading that checkpoint back
  (`load_hf_params` + `update_weights`), what `/update_weights_from_disk` costs on our server.
Last stdout line: one JSON object; also written to benchmarks/results/weight_sync[_<model>].json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


def _timed(fn, *args, **kw) -> float:
    import jax

    t = time.perf_counter()
    jax.block_until_ready(fn(*args, **kw))
    return time.perf_counter() - t


def run(model: str, layers: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from tau2jax.weights.hf_read import load_hf_params
    from tau2jax.inference import weight_sync
    from tau2jax.inference.jax_engine import JaxEngine
    from tau2jax.models import qwen3
    from tau2jax.models.configs import get_model_config, num_params

    cfg = get_model_config(model, **({"num_layers": layers} if layers else {}))
    gpu = jax.default_backend() == "gpu"
    engine_dtype = jnp.bfloat16 if gpu else jnp.float32
    params = jax.jit(lambda k: qwen3.init_params(cfg, k))(jax.random.key(0))  # the learner's fp32 masters
    engine = JaxEngine(jax.tree.map(lambda x: x.astype(engine_dtype), params), cfg, max_seq_len=256, max_batch=1,
                       compute_dtype=engine_dtype)

    def in_process(v):
        engine.update_weights(params, version=v)
        return jax.tree.leaves(engine._params)[0]  # noqa: SLF001  (block on the engine's copy)

    in_proc = [_timed(in_process, v) for v in range(1, repeats + 1)]
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as root:
        publish, load = [], []
        for v in range(1, repeats + 1):
            t = time.perf_counter()
            path = weight_sync.publish(params, cfg, root, v, keep=1)
            publish.append(time.perf_counter() - t)
            t = time.perf_counter()
            loaded, _ = load_hf_params(path, "bfloat16" if gpu else "float32")
            engine.update_weights(loaded, version=100 + v)
            jax.block_until_ready(jax.tree.leaves(engine._params)[0])  # noqa: SLF001
            load.append(time.perf_counter() - t)
            del loaded
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    engine.close()
    med = lambda xs: round(sorted(xs)[len(xs) // 2], 4)  # noqa: E731
    return {
        "model": model, "num_layers": cfg.num_layers, "params": num_params(cfg), "device": str(jax.devices()[0].device_kind),
        "engine_dtype": str(jnp.dtype(engine_dtype)), "repeats": repeats,
        "in_process": {"pause_s": med(in_proc)},  # the copy is the pause: one figure
        "disk": {"transfer_s": med(publish), "pause_s": med(load), "checkpoint_bytes": size},
    }  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model (CPU)")
    p.add_argument("--model", default="qwen3_4b")
    p.add_argument("--layers", type=int, default=0, help="layers of the model shape (0 = all)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="result file (default benchmarks/results/weight_sync[_<model>].json)")
    args = p.parse_args(argv)
    model = "tiny" if args.quick else args.model
    result = run(model, args.layers, args.repeats)
    print(f"{model} ({result['params'] / 1e9:.2f}B params, engine {result['engine_dtype']}, {result['device']}): "
          f"in-process pause {result['in_process']['pause_s']:.3f} s; disk: publish {result['disk']['transfer_s']:.2f} s "
          f"({result['disk']['checkpoint_bytes'] / 2**30:.2f} GiB), engine reload pause {result['disk']['pause_s']:.2f} s")
    common.write_result(result, args.out or common.result_path(f"weight_sync{'' if args.quick else '_' + model}.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
