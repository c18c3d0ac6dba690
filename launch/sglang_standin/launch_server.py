"""`sglang.launch_server` stood in by tau2jax's built-in server (`tau2jax.inference.server`), for
rehearsing launch/gpu_node.sh on CPU. It takes exactly the flags gpu_node.sh passes and refuses any
other (argparse, as SGLang's ServerArgs does), loads the HF model directory SGLang would (config,
safetensors by tensor name, the tokenizer files and chat template in it) and serves SGLang's HTTP
subset that tau2jax uses with SGLang's rules for the version and flags it runs under
(`SGLangRules.launched`: /health a one-token generation, seeds only with
--enable-deterministic-inference, the version's finish order and tool-call shapes, tool calls parsed
only with --tool-call-parser). The table with SGLang's sources is in docs/gpu_serving.md.

Not SGLang flags (they would be refused): SGLANG_STANDIN_MAX_TOKENS caps an OpenAI request that
names no max_tokens (default 64: SGLang lets it run to the context, scheduler.py
init_req_max_new_tokens, and a random tiny user model never stops); SGLANG_STANDIN_VERSION is the
version reported (0.5.3's rules apply below); SGLANG_STANDIN_LOG_DIR, if set, gets
`<served-model-name>-requests.jsonl`: a line per /generate result (weight version, digests of the
prompt and output ids, requests in flight), what launch/rehearsal.py's tally checks turns against.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys

# SGLang 0.5.3 server_args.py: deterministic inference needs one of these attention backends
DETERMINISTIC_BACKENDS = ("flashinfer", "fa3", "triton")


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m sglang.launch_server (tau2jax stand-in)")
    p.add_argument("--model-path", required=True)
    p.add_argument("--served-model-name", default="")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--dp-size", type=int, default=1)  # replicas behind SGLang's round-robin (ReplicaSet)
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--context-length", type=int, default=None)
    p.add_argument("--mem-fraction-static", type=float, default=None)
    p.add_argument("--weight-version", default="default")
    p.add_argument("--tool-call-parser", default=None, choices=["qwen25"])
    p.add_argument("--enable-deterministic-inference", action="store_true")
    p.add_argument("--attention-backend", default=None)
    args = p.parse_args(argv)
    if args.enable_deterministic_inference and os.environ.get("SGLANG_STANDIN_VERSION", "0.5.3") == "0.5.3" \
            and args.attention_backend not in DETERMINISTIC_BACKENDS:
        p.error(f"--enable-deterministic-inference needs --attention-backend in {DETERMINISTIC_BACKENDS} "
                f"(SGLang 0.5.3), got {args.attention_backend}")
    return args


# SGLang's DP controller dispatches round-robin by default (--load-balance-method round_robin,
# managers/data_parallel_controller.py); a finished request stays in the scheduler's running batch
# about one iteration (the flush race window, sgl-project/sglang#14062).
FLUSH_LAG_S = 0.2


class ReplicaSet:
    """--dp-size N: N built-in engines (N copies of the weights), requests dealt round-robin, a weight
    update loaded into every one; what the server sees is one engine."""

    def __init__(self, replicas):
        self.replicas = replicas
        self.cfg, self.max_seq_len = replicas[0].cfg, replicas[0].max_seq_len
        self._next = itertools.count()

    @property
    def policy_version(self) -> int:
        return self.replicas[0].policy_version

    def generate(self, input_ids, params):
        per = params if isinstance(params, list) else [params] * len(input_ids)
        futures = [self.replicas[next(self._next) % len(self.replicas)].submit(ids, p) for ids, p in zip(input_ids, per)]
        return [f.result() for f in futures]

    def update_weights(self, params, version):
        for r in self.replicas:
            r.update_weights(params, version)


def _request_log(name: str) -> str | None:
    log_dir = os.environ.get("SGLANG_STANDIN_LOG_DIR")
    return os.path.join(log_dir, f"{name or 'model'}-requests.jsonl") if log_dir else None


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from tau2jax.data.tokenizer import load_tokenizer
    from tau2jax.inference.engine import UNKNOWN_VERSION
    from tau2jax.inference.jax_engine import JaxEngine
    from tau2jax.inference.server import Server, create_app
    from tau2jax.inference.sglang_rules import SGLangRules

    missing = [f for f in ("config.json", "tokenizer.json") if not os.path.exists(os.path.join(args.model_path, f))]
    if missing:
        print(f"error: --model-path {args.model_path} has no {', '.join(missing)} (SGLang needs a complete HF dir)",
              file=sys.stderr)
        return 2
    # CPU: float32 compute whatever --dtype says (bfloat16 matmuls are emulated and slow there)
    dtype = "float32"
    context = args.context_length or 32768
    tokenizer = load_tokenizer(args.model_path)
    # SGLang reports "default" until an update (or --weight-version) names a version
    version = int(args.weight_version) if args.weight_version.isdigit() else UNKNOWN_VERSION
    first = JaxEngine.from_hf_dir(args.model_path, dtype=dtype, tokenizer=tokenizer, max_seq_len=context,
                                  max_batch=16, policy_version=version)
    engine = ReplicaSet([first] + [JaxEngine(first._params, first.cfg, tokenizer=tokenizer, max_seq_len=context,  # noqa: SLF001
                                             max_batch=16, policy_version=version) for _ in range(args.dp_size - 1)])
    rules = SGLangRules.launched(os.environ.get("SGLANG_STANDIN_VERSION", "0.5.3"),
                                 args.enable_deterministic_inference, args.tool_call_parser)
    server = Server(engine, tokenizer, model_path=args.model_path, context_length=context, rules=rules,
                    served_model_name=args.served_model_name,
                    default_max_tokens=int(os.environ.get("SGLANG_STANDIN_MAX_TOKENS", "64")),
                    request_log=_request_log(args.served_model_name), flush_lag_s=FLUSH_LAG_S,
                    die_on_engine_failure=True)
    print(f"sglang stand-in: dp_size={args.dp_size} replicas={len(engine.replicas)} (round-robin)", flush=True)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
