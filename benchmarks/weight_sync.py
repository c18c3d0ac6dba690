"""Weight sync from the learner to the rollout engine: how long the engine pauses, how long the
publish takes, for both paths the RL loop uses, and the old publish beside the new one.

    python benchmarks/weight_sync.py --quick                 # tiny model, CPU (checks the paths)
    python benchmarks/weight_sync.py --model qwen3_0_6b      # CPU: Qwen3-0.6B shape
    python benchmarks/weight_sync.py --model qwen3_4b         # GPU: Qwen3-4B-shaped weights

- in-process (built-in engine): `JaxEngine.stage_weights` makes the engine's copy of the learner's
  fp32 params on the devices while it keeps serving (`stage_s`); `swap_weights` is the pause.
- disk (SGLang's path): `weight_sync.publish` (bf16 cast + HF transposes on the devices, streamed
  into safetensors, one fsync per file, atomic rename) runs while rollouts go on; the pause is the
  engine reading that checkpoint back (`load_hf_params` + `update_weights`), what
  `/update_weights_from_disk` costs on our server. Published where a local server's run publishes
  (`weight_sync.default_root`: /dev/shm when it exists). `old_publish_*`: the previous writer
  (whole parameter to the host, numpy transposes, `safetensors.numpy.save_file`), same run and dir.
  One untimed publish first compiles the converters (once per run in training).
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


def old_publish(params, cfg, out_dir: str) -> None:
    """The writer before issue 17, kept here for the comparison: each stacked parameter copied to the
    host whole, layers transposed and cast by numpy, one `save_file` per shard, fsync, rename."""
    import numpy as np
    from safetensors.numpy import save_file

    from tau2jax.weights import mapping
    from tau2jax.weights.hf_write import fsync

    bf16 = mapping.np_dtype("bfloat16")
    tmp = out_dir + ".tmp"
    os.makedirs(tmp)
    tensors, cached = {}, (None, None)
    for name, (row, layer) in mapping.hf_tensors(cfg).items():
        if cached[0] != row.ours:
            cached = (row.ours, np.asarray(mapping.get_path(params, row.ours)))
        value = cached[1] if layer is None else cached[1][layer]
        tensors[name] = np.ascontiguousarray(row.hook.to_hf(value), dtype=bf16)
    path = os.path.join(tmp, "model-00001-of-00001.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    fsync(path)
    os.rename(tmp, out_dir)


def run(model: str, layers: int, repeats: int) -> dict:
    import shutil

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

    stage, swap = [], []
    for v in range(1, repeats + 1):
        t = time.perf_counter()
        staged = jax.block_until_ready(engine.stage_weights(params))  # the engine serves meanwhile
        t1 = time.perf_counter()
        stage.append(t1 - t)
        swap.append(engine.swap_weights(staged, version=v))  # the lock held: freeing the old copy after is no pause
        del staged
    local = os.path.isdir(weight_sync.SHM) and os.access(weight_sync.SHM, os.W_OK)
    with tempfile.TemporaryDirectory(dir=weight_sync.SHM if local else os.environ.get("TMPDIR")) as root:
        publish, old, load = [], [], []
        weight_sync.publish(params, cfg, root, 0, keep=1)  # warm-up: compiles the on-device converters
        for v in range(1, repeats + 1):
            t = time.perf_counter()
            old_publish(params, cfg, os.path.join(root, f"old_{v}"))
            old.append(time.perf_counter() - t)
            shutil.rmtree(os.path.join(root, f"old_{v}"))
            t = time.perf_counter()
            path = weight_sync.publish(params, cfg, root, v, keep=1)
            publish.append(time.perf_counter() - t)
            t = time.perf_counter()
            loaded, _ = load_hf_params(path, "bfloat16" if gpu else "float32")
            engine.update_weights(loaded, version=100 + v)
            load.append(time.perf_counter() - t)
            del loaded
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    engine.close()
    med = lambda xs: round(sorted(xs)[len(xs) // 2], 4)  # noqa: E731
    return {
        "model": model, "num_layers": cfg.num_layers, "params": num_params(cfg), "device": str(jax.devices()[0].device_kind),
        "engine_dtype": str(jnp.dtype(engine_dtype)), "repeats": repeats, "checkpoint_bytes": size,
        "in_process": {"pause_s": med(swap), "stage_s": med(stage)},
        "disk": {"publish_dir": "/dev/shm" if local else "TMPDIR", "transfer_s": med(publish),
                 "publish_gb_per_s": round(size / med(publish) / 1e9, 3), "old_publish_s": med(old),
                 "old_publish_gb_per_s": round(size / med(old) / 1e9, 3), "pause_s": med(load),
                 "checkpoint_bytes": size},
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
          f"in-process pause {result['in_process']['pause_s']:.4f} s (copy while serving {result['in_process']['stage_s']:.2f} s); "
          f"disk: publish {result['disk']['transfer_s']:.2f} s = {result['disk']['publish_gb_per_s']:.2f} GB/s "
          f"(old {result['disk']['old_publish_gb_per_s']:.2f} GB/s) of {result['checkpoint_bytes'] / 1e9:.2f} GB, "
          f"engine reload pause {result['disk']['pause_s']:.2f} s")
    common.write_result(result, args.out or common.result_path(f"weight_sync{'' if args.quick else '_' + model}.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
