"""Where SGLang's server behaves in ways our code depends on, written down once for the built-in
server (`tau2jax.inference.server`), which follows them, and the SGLang stand-in
(`launch/sglang_standin/`), which turns on the strict ones. Each rule names the SGLang source it
comes from (read in the 0.5.3 and 0.5.23 wheels, `sglang/srt/`); docs/gpu_serving.md has the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import uuid
from dataclasses import dataclass

# managers/tp_worker.py: max_req_input_len = min(context_len - 1, pool - 1) - 5, checked by
# managers/utils.py validate_input_length with `>=`: a prompt needs context - 6 tokens of room.
INPUT_MARGIN = 6

# entrypoints/http_server.py: HEALTH_CHECK_TIMEOUT = SGLANG_HEALTH_CHECK_TIMEOUT (default 20 s)
HEALTH_CHECK_TIMEOUT_S = float(os.environ.get("SGLANG_HEALTH_CHECK_TIMEOUT", "20"))

# function_call/qwen25_detector.py: the block markers, newlines included
_BOT, _EOT = "<tool_call>\n", "\n</tool_call>"
_BLOCK = re.compile(re.escape(_BOT) + "(.*?)" + re.escape(_EOT), re.DOTALL)

SEED_POLICIES = ("honoured", "deterministic", "ignored")

# The key a trainer and its servers share when none is configured (`engine.api_key` ""): our
# server's and the stand-in's --api-key default; launch/gpu_node.sh passes it to SGLang as --api-key.
API_KEY_ENV = "TAU2JAX_API_KEY"


@dataclass(frozen=True)
class SGLangRules:
    """The rules that differ between SGLang versions or launch flags. The defaults are the built-in
    server's (kinder: seeds honoured, /health answers at once); `SGLangRules.launched` is what an
    SGLang started with those flags does.

    version: "0.5.3" checks the length limit before stop tokens (schedule_batch.py
      Req.check_finished), so a stop token sampled as the last allowed token finishes as "length";
      later versions (0.5.23 update_finish_state) check stop strings, then tokens, then the length.
      0.5.3's qwen25 tool calls carry index -1 and a reply holding `<tool_call>\\n` finishes as
      "tool_calls" even when no call parses; 0.5.23 numbers calls 0.. and keeps the finish then.
    seeds: "honoured" (built-in), "deterministic" (--enable-deterministic-inference: the request's
      sampling_seed, 42 when it names none; sampling_batch_info.py) or "ignored" (without it
      SGLang never reads sampling_seed).
    health_generates: /health runs a one-token generation behind the weight-update lock and answers
      200 once any output arrives, polled each second, 503 after HEALTH_CHECK_TIMEOUT_S
      (http_server.py health_generate).
    tool_call_parser: "qwen25" or None (--tool-call-parser: without it the OpenAI endpoint returns
      the raw text, tool calls unparsed).
    """

    version: str = "0.5.23"
    seeds: str = "honoured"
    health_generates: bool = False
    tool_call_parser: str | None = "qwen25"

    def __post_init__(self):
        if self.seeds not in SEED_POLICIES:
            raise ValueError(f"seeds must be one of {SEED_POLICIES}, got {self.seeds!r}")
        if self.tool_call_parser not in (None, "qwen25"):
            raise ValueError(f"tool_call_parser must be qwen25 or None, got {self.tool_call_parser!r}")

    @classmethod
    def launched(cls, version: str, deterministic: bool, tool_call_parser: str | None) -> "SGLangRules":
        return cls(version=version, seeds="deterministic" if deterministic else "ignored",
                   health_generates=True, tool_call_parser=tool_call_parser)

    @property
    def is_0_5_3(self) -> bool:
        """0.5.3 and its .postN releases; any other version gets 0.5.23's rules."""
        return self.version.split(".post")[0] == "0.5.3"

    @property
    def length_before_stop(self) -> bool:
        return self.is_0_5_3

    def seed(self, requested: int | None) -> int | None:
        if self.seeds == "honoured":
            return requested
        if self.seeds == "deterministic":
            return 42 if requested is None else requested
        return None

    def tool_calls(self, text: str, tool_names: set[str]) -> tuple[str | None, list[dict] | None, bool]:
        """qwen25 parsing of a chat reply -> (content, OpenAI tool_calls or None, whether a "stop"
        finish becomes "tool_calls"). As SGLang (serving_chat.py _process_tool_calls,
        qwen25_detector.py detect_and_parse): blocks whose JSON does not parse or that name a tool
        the request did not offer are dropped; with calls, the content is the text before the
        first block, stripped; with none, the whole text."""
        if self.tool_call_parser is None or _BOT not in text:
            return text, None, False
        calls = []
        for block in _BLOCK.findall(text):
            try:
                action = json.loads(block.strip())
            except json.JSONDecodeError:
                continue
            for act in action if isinstance(action, list) else [action]:
                if isinstance(act, dict) and act.get("name") in tool_names:
                    calls.append((act["name"], act.get("parameters") or act.get("arguments", {})))
        old = self.is_0_5_3
        if not calls:
            return text, ([] if old else None), old
        content = text[: text.find(_BOT)].strip()
        return content, [
            {"id": f"call_{uuid.uuid4().hex[:24]}", "index": -1 if old else i, "type": "function",
             "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
            for i, (name, args) in enumerate(calls)], True


# entrypoints/openai/protocol.py: what a chat request omitting a sampling parameter gets.
# 0.5.3: ChatCompletionRequest's field defaults (temperature 0.7, not SamplingParams' 1.0); there is
# no --sampling-defaults. 0.5.23: ChatCompletionRequest._DEFAULT_SAMPLING_PARAMS, under the model's
# generation_config.json when --sampling-defaults is "model" (its default; arg_groups/fields/serving.py,
# configs/model_config.py get_default_sampling_params, ChatCompletionRequest.to_sampling_params).
CHAT_DEFAULTS_0_5_3 = {"temperature": 0.7, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}
CHAT_DEFAULTS_OPENAI = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}
SAMPLING_DEFAULTS = ("openai", "model")  # 0.5.23's --sampling-defaults choices; default "model"
_FUNCTION_FIELDS = ("description", "name", "parameters", "strict", "defer_loading")


def chat_sampling_defaults(version: str, sampling_defaults: str | None, generation_config: dict) -> dict:
    """The values SGLang `version` gives a chat request's omitted temperature, top_p, top_k, min_p
    and repetition_penalty (`sampling_defaults`: 0.5.23's flag, None on 0.5.3)."""
    if version.split(".post")[0] == "0.5.3":
        return dict(CHAT_DEFAULTS_0_5_3)
    if sampling_defaults not in SAMPLING_DEFAULTS:
        raise ValueError(f"sampling_defaults must be one of {SAMPLING_DEFAULTS}, got {sampling_defaults!r}")
    model = {k: generation_config[k] for k in CHAT_DEFAULTS_OPENAI
             if sampling_defaults == "model" and generation_config.get(k) is not None}
    return {**CHAT_DEFAULTS_OPENAI, **model}


def template_tools(version: str, tools: list[dict] | None) -> list[dict] | None:
    """The `tools` SGLang hands the chat template (serving_chat.py `_process_messages`). 0.5.3:
    each tool's bare function as its pydantic model dumps it, `{"description", "name", "parameters",
    "strict": false}` in that order. 0.5.23: the whole tool, `{"type", "function", "defer_loading":
    null}`, the function's keys in the order the client sent them (Function._serialize), a missing
    description or parameters as null, strict and defer_loading only when given."""
    if not tools:
        return None
    out = []
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"a tool must be {{'type': 'function', 'function': {{'name': ...}}}}, got {t!r}")
        if version.split(".post")[0] == "0.5.3":
            out.append({"description": fn.get("description"), "name": fn["name"], "parameters": fn.get("parameters"),
                        "strict": bool(fn.get("strict", False))})
            continue
        dumped = {k: fn.get(k) for k in _FUNCTION_FIELDS}
        for k in ("strict", "defer_loading"):
            if dumped[k] is None:
                dumped.pop(k)
        order = [k for k in fn if k in dumped]
        dumped = {k: dumped[k] for k in order + [k for k in dumped if k not in order]}
        out.append({"type": t.get("type", "function"), "function": dumped, "defer_loading": t.get("defer_loading")})
    return out


class ModelUpdateLock:
    """SGLang's model_update_lock (aio_rwlock.py, taken in tokenizer_manager.py): every request
    holds it shared from arrival to answer; update_weights_from_disk takes it exclusively, so an
    update waits for the requests in flight to finish on the old weights (drain) and, writers
    first, holds back the requests that arrive meanwhile until the new weights are in."""

    def __init__(self):
        self._cond = asyncio.Condition()  # binds to the running loop on first use
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.asynccontextmanager
    async def shared(self):
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            async with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self):
        async with self._cond:
            self._writers_waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._writer and not self._readers)
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            async with self._cond:
                self._writer = False
                self._cond.notify_all()
