"""SFT train-step throughput: our jitted step vs a transformers + torch training step, same weights.

    python benchmarks/train_step.py [--quick]   # ~20 s on 2 shared CPU cores; --quick ~10 s
    python benchmarks/train_step.py --mfu       # GPU only: Qwen3-4B-shaped step, reports MFU

One step = forward, masked next-token cross-entropy (mean over the loss mask), backward,
global-norm clipping at 1.0, AdamW. Ours: make_sft_step + jit_step on a 1-device mesh, optimizer
from make_optimizer. Theirs: Qwen3ForCausalLM, torch.optim.AdamW (no decay on norm weights, as
ours), clip_grad_norm_, step, zero_grad. Both float32 on --threads CPU cores (default 1), same
weights (a random HF Qwen3 converted with hf_to_orbax), same batch of B rows x T tokens, one
segment per row (no packing, so both compute the same thing). The first step of each is the
warm-up (JAX compile) and the loss check: the two first-step losses must agree within 1e-4.
Then --iters steps of each, alternating, and tokens/s from the median step; compiles_after_warmup
counts the jitted step's compiles after the first (goal 0: every step has the same shapes). Prints a table and,
as the last line, a JSON object that is also written to benchmarks/results/train_step.json
(--mfu: train_step_mfu.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import common  # benchmarks/common.py; also puts the repo root on sys.path

LOSS_ATOL = 1e-4
# Dense bf16 tensor-core peak (FLOP/s) by jax device_kind.
PEAK_BF16 = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12}


def _optim_config(lr: float):
    import ml_collections

    return ml_collections.ConfigDict(dict(lr=lr, schedule="constant", warmup_frac=0.0, min_lr_ratio=0.0,
                                          weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0))


def _jax_step(cfg, params, optim, batch, **step_kw):
    """(run, jitted): run() does one jitted SFT step on a 1-device mesh and returns the loss
    (blocking); jitted is the jax.jit function, whose _cache_size() counts its compiled shapes."""
    import jax

    from tau2jax.learn.optimizer import make_optimizer
    from tau2jax.learn.sft_step import jit_step, make_sft_step
    from tau2jax.learn.train_state import create_state, state_shardings
    from tau2jax.models import qwen3
    from tau2jax.parallel import sharding

    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tx, schedule = make_optimizer(optim, total_steps=1000)
    p_shard = qwen3.param_shardings(cfg, mesh)
    shardings = state_shardings(tx, jax.eval_shape(lambda: params), p_shard, mesh)
    state = create_state(params, tx, shardings, seed=0)
    step = jit_step(make_sft_step(cfg, tx, schedule, **step_kw), shardings, sharding.batch_sharding(mesh))
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))

    def run():
        nonlocal state
        with jax.set_mesh(mesh):
            state, metrics = step(state, batch)
        jax.block_until_ready(state)
        return float(metrics["loss"])

    return run, step


def run(size: str, iters: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    spec = common.SIZES[size]  # forward.py's shapes, so the two results read side by side
    b, t = spec["batch"], spec["seq_len"]
    lr = 1e-4
    params, cfg, model = common.tiny_qwen3(spec["model"])
    model.train()

    rng = np.random.default_rng(0)
    seq = rng.integers(0, cfg.vocab_size, (b, t + 1), dtype=np.int32)
    batch = dict(tokens=seq[:, :-1], targets=seq[:, 1:],
                 loss_mask=(rng.random((b, t)) < 0.6).astype(np.int32),
                 positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
                 segment_ids=np.ones((b, t), np.int32))
    jax_step, jitted = _jax_step(cfg, params, _optim_config(lr), batch)

    # torch: same AdamW hyper-parameters; parameters() yields the tied embedding once.
    named = list(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for _, p in named if p.ndim > 1], "weight_decay": 0.01},
                             {"params": [p for _, p in named if p.ndim <= 1], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.999), eps=1e-8)
    x, y = torch.from_numpy(batch["tokens"].astype(np.int64)), torch.from_numpy(batch["targets"].astype(np.int64))
    mask = torch.from_numpy(batch["loss_mask"].astype(np.float32))

    def hf_step():
        logits = model(input_ids=x).logits
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        loss = (nll * mask.flatten()).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    load_before = common.load_average()
    first, sec = common.interleaved({"jax": jax_step, "hf": hf_step}, iters)
    if abs(first["jax"] - first["hf"]) > LOSS_ATOL:
        raise SystemExit(f"first-step losses disagree: jax {first['jax']:.6f} vs hf {first['hf']:.6f} "
                         f"(|diff| > {LOSS_ATOL}); the two steps do not compute the same thing")
    n = b * t
    return {
        "jax_tokens_per_s": round(n / sec["jax"], 1),
        "hf_tokens_per_s": round(n / sec["hf"], 1),
        "speedup_vs_hf": round(sec["hf"] / sec["jax"], 3),
        "loss_first_jax": round(first["jax"], 6),
        "loss_first_hf": round(first["hf"], 6),
        # The warm-up compiled one entry into the fresh jit; any more means a step of the same
        # shapes recompiled (e.g. the donated state came back with other shardings). Goal 0.
        "compiles_after_warmup": jitted._cache_size() - 1,
        "config": {**spec["model"], "batch": b, "seq_len": t, "iters": iters, "dtype": "float32",
                   "optimizer": f"adamw lr={lr} wd=0.01 clip=1.0", "size": size,
                   **common.machine_config(model)},
        "threads": threads,  # top level, not config.cpu_threads: the format of the earlier results
        "load_avg": {"before": load_before, "after": common.load_average()},
    }


def _grpo_batch(rng, b: int, seq_len: int, vocab: int) -> dict:
    """A packed GRPO batch: 4 trajectories a row, half the tokens sampled, random advantages."""
    seg = np.repeat(np.arange(1, 5, dtype=np.int32), seq_len // 4)[None].repeat(b, 0)
    pos = np.tile(np.arange(seq_len // 4, dtype=np.int32), 4)[None].repeat(b, 0)
    mask = (rng.random((b, seq_len)) < 0.5).astype(np.int32)
    return dict(tokens=rng.integers(0, vocab, (b, seq_len), dtype=np.int32),
                targets=rng.integers(0, vocab, (b, seq_len), dtype=np.int32), loss_mask=mask,
                behaviour_logprobs=(-rng.random((b, seq_len)) * 5 * mask).astype(np.float32),
                temperature=np.full((b, seq_len), 0.7, np.float32),
                advantages=(rng.standard_normal((b, seq_len)) * mask).astype(np.float32),
                policy_version=np.zeros((b, seq_len), np.int32), group=np.zeros((b, seq_len), np.int32),
                segment_ids=seg, positions=pos)


def mfu_fields(cfg, seq_len: int, tokens_per_s: float, grpo: bool, peak: float) -> dict:
    """mfu: PaLM's convention (attention counted over all T keys, as MaxText and Megatron report);
    mfu_causal: attention FLOPs halved, what a causal kernel actually computes. They part at long
    T: at 16k tokens attention is half of Qwen3-4B's full-convention FLOPs. GRPO counts the
    reference forward too, and a token attends within its own trajectory (seq_len / 4 a row)."""
    from tau2jax.models.configs import flops_per_token

    attn_len = seq_len // 4 if grpo else seq_len
    full = flops_per_token(cfg, attn_len)
    attention = full - flops_per_token(cfg, 0)
    scale = 8 / 6 if grpo else 1.0  # + the reference's forward (2N of the 6N)
    return {"mfu": round(full * scale * tokens_per_s / peak, 4),
            "mfu_causal": round((full - attention / 2) * scale * tokens_per_s / peak, 4)}


def run_mfu(iters: int, seq_len: int, layers: int, remat: str = "full", attn_chunk: int = 1024,
            attn_impl: str = "xla", grpo: bool = False, max_batch: int = 8) -> dict:
    """Qwen3-4B-shaped step (random init, fp32 masters, bf16 compute, --remat) on one GPU.
    The batch is the largest of max_batch, max_batch/2, ..., 1 rows whose compiled step fits in
    device memory. SFT rows are one sequence each. grpo: the GRPO step (recipe loss: clip
    0.2/0.28, k3 KL 0.01 to a frozen bf16 reference, entropy 0.001, vocab-chunked log-probs) on
    rows of 4 packed trajectories; its FLOPs count the reference forward too (8N, not 6N) and
    attention over each trajectory's own length (seq_len / 4), not the row's."""
    import jax
    import jax.numpy as jnp

    if jax.default_backend() != "gpu":
        raise SystemExit(f"--mfu needs a GPU (jax backend is {jax.default_backend()!r})")
    from tau2jax.learn.optimizer import make_optimizer
    from tau2jax.learn.sft_step import jit_step, make_sft_step
    from tau2jax.learn.train_state import create_state, state_shardings
    from tau2jax.models import qwen3
    from tau2jax.models.configs import get_model_config
    from tau2jax.parallel import sharding

    dev = jax.devices()[0]
    if dev.device_kind not in PEAK_BF16:
        raise SystemExit(f"no bf16 peak known for {dev.device_kind!r}; add it to PEAK_BF16")
    # Qwen3-4B layer shapes; fewer layers when the whole model's fp32 weights + Adam state (48 GB; 64 GB with gradients) does
    # not fit one GPU beside its activations (on a node it is FSDP-sharded over 8).
    cfg = get_model_config("qwen3_4b", num_layers=layers)
    mesh = sharding.make_mesh(1, 1, 1, devices=[dev])
    tx, schedule = make_optimizer(_optim_config(1e-5), total_steps=1000)
    p_shard = qwen3.param_shardings(cfg, mesh)
    params = jax.jit(lambda k: qwen3.init_params(cfg, k), out_shardings=p_shard)(jax.random.key(0))
    shardings = state_shardings(tx, jax.eval_shape(lambda: params), p_shard, mesh)
    state = create_state(params, tx, shardings, seed=0)
    del params
    kw = dict(compute_dtype=jnp.bfloat16, remat=remat, loss_chunk=1024, attn_chunk=attn_chunk, attn_impl=attn_impl)
    if grpo:
        from tau2jax.rl.grpo_step import jit_grpo_step, make_grpo_step
        from tau2jax.rl.losses import PolicyLossConfig

        loss_cfg = PolicyLossConfig(eps_low=0.2, eps_high=0.28, kl_coef=0.01, kl_type="k3", entropy_coef=0.001)
        ref = jax.tree.map(lambda x: x.astype(jnp.bfloat16), state.params)
        ref_shard = jax.tree.map(lambda x: x.sharding, ref)
        jitted = jit_grpo_step(make_grpo_step(cfg, tx, schedule, loss_cfg, vocab_chunk=151936 // 8, **kw),
                               shardings, sharding.batch_sharding(mesh), ref_shard)
        def lower(st, bt):
            return jitted.lower(st, bt, ref)
    else:
        lower = jit_step(make_sft_step(cfg, tx, schedule, **kw), shardings, sharding.batch_sharding(mesh)).lower
    limit = dev.memory_stats()["bytes_limit"]
    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh):
        for b in [max_batch >> i for i in range(max_batch.bit_length())]:
            batch = _grpo_batch(rng, b, seq_len, cfg.vocab_size) if grpo else dict(
                         tokens=rng.integers(0, cfg.vocab_size, (b, seq_len), dtype=np.int32),
                         targets=rng.integers(0, cfg.vocab_size, (b, seq_len), dtype=np.int32),
                         loss_mask=np.ones((b, seq_len), np.int32),
                         positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), (b, seq_len)).copy(),
                         segment_ids=np.ones((b, seq_len), np.int32))
            t_compile = time.perf_counter()
            try:
                compiled = lower(state, batch).compile()
            except jax.errors.JaxRuntimeError as e:  # XLA's autotuner can run out of memory first
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                need = float("inf")
                continue
            m = compiled.memory_analysis()
            need = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
            if need < 0.95 * limit:
                t_compile = time.perf_counter() - t_compile
                break
        else:
            raise SystemExit(f"even batch 1 x {seq_len} needs {need / 2**30:.1f} GiB > {limit / 2**30:.1f} GiB")
        call = (lambda st: compiled(st, batch, ref)) if grpo else (lambda st: compiled(st, batch))
        state, _ = call(state)  # warm-up
        jax.block_until_ready(state)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            state, metrics = call(state)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t0)
    tok_s = b * seq_len / float(np.median(times))
    return {
        "step": "grpo" if grpo else "sft",
        "tokens_per_s": round(tok_s, 1),
        **mfu_fields(cfg, seq_len, tok_s, grpo, PEAK_BF16[dev.device_kind]),
        "loss": round(float(metrics["loss"]), 4),
        "step_s": round(float(np.median(times)), 4),
        "compile_s": round(t_compile, 1),
        "config": {"model": "qwen3_4b", "num_layers": layers, "batch": b, "seq_len": seq_len, "iters": iters, "compute_dtype": "bfloat16",
                   "remat": remat, "loss_chunk": 1024, "attn_chunk": attn_chunk, "attn_impl": attn_impl, "device": dev.device_kind,
                   "peak_flops": PEAK_BF16[dev.device_kind], "memory_gib": round(need / 2**30, 1)},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller model and batch")
    p.add_argument("--mfu", action="store_true", help="GPU: Qwen3-4B-shaped step, bf16; reports MFU")
    p.add_argument("--seq-len", type=int, default=4096, help="--mfu sequence length")
    p.add_argument("--layers", type=int, default=36, help="--mfu: layers of the Qwen3-4B shape (36 = all)")
    p.add_argument("--remat", default="full", help="--mfu: remat policy (none | full | dots | attn)")
    p.add_argument("--attn-chunk", type=int, default=1024, help="--mfu: queries per attention block (0 = dense)")
    p.add_argument("--attn-impl", default="xla", help="--mfu: xla | flash | cudnn")
    p.add_argument("--max-batch", type=int, default=8, help="--mfu: the first batch size tried (halved until it fits)")
    p.add_argument("--iters", type=int, default=5, help="timed steps per framework (median is reported)")
    p.add_argument("--grpo", action="store_true", help="--mfu: the GRPO step (KL reference forward included)")
    common.add_threads_arg(p)
    p.add_argument("--out", default=None, help="result file (default benchmarks/results/train_step[_mfu].json)")
    args = p.parse_args(argv)
    out = args.out or common.result_path("train_step_mfu.json" if args.mfu else "train_step.json")
    if args.mfu:
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # the default 0.75 leaves 20 GB idle
        result = run_mfu(args.iters, args.seq_len, args.layers, args.remat, args.attn_chunk, args.attn_impl, args.grpo,
                         args.max_batch)
        c = result["config"]
        print(f"Qwen3-4B {result['step'].upper()} step on {c['device']}: batch {c['batch']} x seq {c['seq_len']}, bf16, remat {c['remat']}, attention {c['attn_impl']}/{c['attn_chunk']}, "
              f"{result['tokens_per_s']:.0f} tokens/s, MFU {100 * result['mfu']:.1f}%")
        common.write_result(result, out)
        return 0
    common.pin_threads(p, args.threads)
    result = run("quick" if args.quick else "full", args.iters, args.threads)
    c = result["config"]
    print(f"Qwen3 SFT train step (fwd+bwd+clip+AdamW), hidden {c['hidden_size']}, {c['num_layers']} layers, "
          f"vocab {c['vocab_size']}, batch {c['batch']} x seq {c['seq_len']}, float32, {args.threads} CPU "
          f"thread(s), median of {c['iters']} steps, load avg {result['load_avg']['before'][0]}")
    print(f"{'impl':<34}{'tokens/s':>10}{'first loss':>14}")
    print(f"{'tau2jax (jit_step, ' + c['jax_backend'] + ')':<34}{result['jax_tokens_per_s']:>10.0f}"
          f"{result['loss_first_jax']:>14.6f}")
    print(f"{'transformers + torch.optim.AdamW':<34}{result['hf_tokens_per_s']:>10.0f}{result['loss_first_hf']:>14.6f}")
    print(f"speedup vs transformers: {result['speedup_vs_hf']:.2f}x; jax compiles after warm-up: "
          f"{result['compiles_after_warmup']} over {c['iters']} steps")
    common.write_result(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
