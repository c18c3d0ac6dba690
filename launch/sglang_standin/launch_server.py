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
    p.add_argument("--dp-size", type=int, default=1)  # one replica here: DP is SGLang's router's business
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


def _request_log(name: str) -> str | None:
    log_dir = os.environ.get("SGLANG_STANDIN_LOG_DIR")
    return os.path.join(log_dir, f"{name or 'model'}-requests.jsonl") if log_dir else None


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from tau2jax.data.tokenizer import load_tokenizer
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
    version = int(args.weight_version) if args.weight_version.isdigit() else 0
    engine = JaxEngine.from_hf_dir(args.model_path, dtype=dtype, tokenizer=tokenizer, max_seq_len=context,
                                   max_batch=16, policy_version=version)
    rules = SGLangRules.launched(os.environ.get("SGLANG_STANDIN_VERSION", "0.5.3"),
                                 args.enable_deterministic_inference, args.tool_call_parser)
    server = Server(engine, tokenizer, model_path=args.model_path, context_length=context, rules=rules,
                    served_model_name=args.served_model_name,
                    default_max_tokens=int(os.environ.get("SGLANG_STANDIN_MAX_TOKENS", "64")),
                    request_log=_request_log(args.served_model_name))
    print(f"sglang stand-in: dp_size={args.dp_size} replicas=1 (one process serves every --dp-size rank)", flush=True)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
