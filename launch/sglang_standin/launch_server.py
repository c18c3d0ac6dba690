"""`sglang.launch_server` stood in by tau2jax's built-in server (`tau2jax.inference.server`), for
rehearsing launch/gpu_node.sh on CPU. It takes exactly the flags gpu_node.sh passes and refuses any
other (argparse, as SGLang's ServerArgs does), loads the HF model directory SGLang would (config,
safetensors by tensor name, the tokenizer files and chat template in it) and serves SGLang's HTTP
subset that tau2jax uses with SGLang's rules for the version and flags it runs under
(`SGLangRules.launched`: /health a one-token generation, seeds only with
--enable-deterministic-inference, the version's finish order and tool-call shapes, tool calls parsed
only with --tool-call-parser). The table with SGLang's sources is in docs/gpu_serving.md.

OpenAI chat as SGLang serves it: the prompt is the model dir's own jinja chat template
(`chat_template.jinja`, else tokenizer_config.json's `chat_template`; none: the server starts, every
chat request is a 400, as SGLang), a request without max_tokens runs to the context
(context - prompt - 2 tokens), and omitted sampling parameters take the version's defaults: 0.5.3
temperature 0.7, top_p 1, top_k -1, min_p 0; 0.5.23 `--sampling-defaults model` (its default) the
model's generation_config.json over OpenAI's 1.0, 1.0, -1, 0 (`--sampling-defaults openai`: those).

Not SGLang flags (they would be refused): SGLANG_STANDIN_VERSION is the version reported and modelled (default
0.5.3; any other gets 0.5.23's rules); SGLANG_STANDIN_WEIGHTS_ROOT, if set (dirs joined by ':'),
the only dirs update_weights_from_disk loads from (our server's rule, as is the version order of
server.check_version_order; SGLang has neither); SGLANG_STANDIN_LOG_DIR, if set, gets
`<served-model-name>-requests.jsonl`: a line per result ("endpoint" /generate or
/v1/chat/completions; weight version, digests of the prompt and output ids, token counts, requests
in flight; chat: "sampling", the parameters SGLang would sample with), what launch/rehearsal.py's
tally checks turns against.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys

# SGLang 0.5.3 server_args.py: deterministic inference needs one of these attention backends
DETERMINISTIC_BACKENDS = ("flashinfer", "fa3", "triton")


def _version() -> str:
    return os.environ.get("SGLANG_STANDIN_VERSION", "0.5.3")


def _is_0_5_3(version: str) -> bool:
    return version.split(".post")[0] == "0.5.3"


def parse(argv):
    version = _version()
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
    p.add_argument("--api-key", default=None)  # SGLang's: every endpoint but /health needs "Bearer KEY"
    if not _is_0_5_3(version):  # 0.5.2x arg_groups/fields/serving.py; 0.5.3 has no such flag
        p.add_argument("--sampling-defaults", default="model", choices=["openai", "model"])
    args = p.parse_args(argv)
    if not 1 <= args.port <= 65535:  # uvicorn would log the port and listen on another (server.port_error's words)
        print(f"error: --port {args.port} is outside 1..65535; pick a free port in that range", file=sys.stderr)
        raise SystemExit(2)
    args.sampling_defaults = getattr(args, "sampling_defaults", None)
    if args.enable_deterministic_inference and _is_0_5_3(version) \
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


def weights_roots() -> list[str] | None:
    """SGLANG_STANDIN_WEIGHTS_ROOT (dirs joined by ':'): the only dirs update_weights_from_disk loads
    from; unset: any path, as SGLang (which has no such check)."""
    roots = [r for r in os.environ.get("SGLANG_STANDIN_WEIGHTS_ROOT", "").split(os.pathsep) if r]
    return roots or None


def generation_config(model_path: str) -> dict:
    """The model dir's generation_config.json ({} without one, as SGLang's get_generation_config)."""
    path = os.path.join(model_path, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from tau2jax.data.tokenizer import load_tokenizer
    from tau2jax.inference.chat_template import HFChatTemplate, MissingChatTemplate
    from tau2jax.inference.engine import UNKNOWN_VERSION
    from tau2jax.inference.jax_engine import JaxEngine
    from tau2jax.inference.server import Server, create_app
    from tau2jax.inference.sglang_rules import SGLangRules, chat_sampling_defaults

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
    rules = SGLangRules.launched(_version(), args.enable_deterministic_inference, args.tool_call_parser)
    template = HFChatTemplate.from_dir(args.model_path)
    if template is None:  # SGLang starts anyway; transformers refuses every chat request
        logging.getLogger("sglang_standin").warning(
            "No HuggingFace chat template found in %s: every /v1/chat/completions request will fail (400), "
            "as SGLang's does", args.model_path)
        template = MissingChatTemplate()
    chat_defaults = chat_sampling_defaults(_version(), args.sampling_defaults, generation_config(args.model_path))
    unmodelled = {k: chat_defaults[k] for k, neutral in (("min_p", 0.0), ("repetition_penalty", 1.0))
                  if chat_defaults.get(k, neutral) != neutral}
    if unmodelled:
        logging.getLogger("sglang_standin").warning(
            "chat defaults %s: SGLang applies them, the stand-in's engine samples without them", unmodelled)
    server = Server(engine, tokenizer, model_path=args.model_path, context_length=context, rules=rules,
                    served_model_name=args.served_model_name,
                    default_max_tokens=None,  # to the context, as SGLang (the user simulator names max_tokens)
                    chat_template=template, chat_defaults=chat_defaults,
                    request_log=_request_log(args.served_model_name), flush_lag_s=FLUSH_LAG_S,
                    die_on_engine_failure=True, weights_roots=weights_roots(), api_key=args.api_key or "")
    print(f"sglang stand-in: dp_size={args.dp_size} replicas={len(engine.replicas)} (round-robin)", flush=True)
    print(f"sglang stand-in: chat sampling defaults {json.dumps(chat_defaults, sort_keys=True)}", flush=True)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
