"""Serve an inference engine over the subset of SGLang's HTTP API that tau2jax uses.

    python -m tau2jax.inference.server --checkpoint /ckpt/qwen3_4b [--host 127.0.0.1] [--port 30000] \\
        [--tokenizer HF_DIR] [--max-batch 32] [--batch-window-ms 5] [--max-seq-len 8192] \\
        [--dtype float32|bfloat16] [--max-tokens 1024] [--weights-root DIR ...] [--api-key KEY]

The CLI serves the built-in `JaxEngine`; in Python any Engine can be served (tests use
`ScriptedEngine`): `RunningServer(create_app(Server(engine, tokenizer)))` runs it on a thread.

Endpoints (request/response shapes follow `sglang.launch_server`, so `SGLangEngine` and litellm
talk to this server and to SGLang alike; POST bodies must be `Content-Type: application/json`, else
400, as on SGLang):

- `POST /generate` {"input_ids": [...] | [[...], ...] (or "text"), "sampling_params": {...} | [...],
  "return_logprob": bool} -> {"text", "output_ids", "meta_info": {"finish_reason": {"type":
  "stop"|"length"|"abort", "matched"|"length"|"message": ...}, "prompt_tokens", "completion_tokens",
  "cached_tokens", "weight_version", "e2e_latency", "output_token_logprobs": [[logprob, id, null]]}}
  (a list of those for a batch). As in SGLang: output ids and logprobs include the stop token the
  generation ended on, "text" does not; the model's end-of-turn tokens (`<|im_end|>`,
  `<|endoftext|>`) always stop generation, and "ignore_eos": true disables every stop token id.
  Stop strings ("stop") are applied by the engine (JaxEngine: needs its tokenizer). The log-probs
  are the engine's `GenerateResult.logprobs` (the behaviour convention = SGLang's).
  Context length (the engine's `max_seq_len`): as SGLang, a prompt of >= that many tokens, or
  prompt + max_new_tokens reaching it, or a prompt of >= context - 6 tokens, is a 400 with
  SGLang's wording. Seeds and the finish order follow `SGLangRules` (version, launch flags).
- `POST /update_weights_from_disk` {"model_path": HF dir, "weight_version": "N"} ->
  {"success", "message"}: as SGLang, waits for the requests in flight to finish on the old weights
  (they report the old version), holds back new ones, loads the safetensors by tensor name, swaps
  them in and empties the engine's prefix cache; without "weight_version" the version stays what it
  was. `sglang_rules.py` has this and the other SGLang rules with their sources. Our rules on top
  (SGLang has neither): "model_path" must lie under a --weights-root (else a 400 that says nothing
  of whether the path exists), and a publish dir's versions only move forward (the same one reloads).
  Files that cannot be loaded are a 400; the old weights keep serving.
- --api-key (SGLang's): every endpoint but /health needs "Authorization: Bearer KEY" (401 without).
- `GET /health` (200 at once, or SGLang's one-token generation under `SGLangRules.health_generates`),
  `GET /get_model_info`, `GET /v1/models` (id: the served model name, the model path after an
  update, as SGLang; `max_model_len` is the context length).
- `POST /v1/chat/completions` (OpenAI, with tools): the messages and tools are rendered with the
  built-in Qwen3-2507 chat format, or, given `chat_template` (the SGLang stand-in), with the model
  dir's own jinja template as SGLang does (`chat_template.py`); `<tool_call>` blocks in the reply
  become OpenAI `tool_calls` by SGLang's qwen25 parser (`--tool-call-parser qwen25`; none: the raw
  text); finish_reason "tool_calls" only when generation stopped, "length" stays "length" (as SGLang).
  Without max_tokens the reply may take the room the context leaves (context - prompt - 2, as
  SGLang), capped at --max-tokens (`default_max_tokens`; None: no cap). Omitted temperature, top_p,
  top_k come from `chat_defaults` (the stand-in: the SGLang version's, `chat_sampling_defaults`).
  This is what the user simulator (tau2 via litellm, `api_base=http://HOST:PORT/v1`) calls.

Requests are validated one by one (`Server.validate`) before they are queued, so a bad one fails
alone with 400. Then they are batched: one worker thread owns the engine; each `engine.generate`
call takes every prompt that queued while the previous call ran (up to --max-batch), waiting at
most --batch-window-ms after the first for more to arrive. An engine exception fails the batch it
hit (HTTP 500: clients retry).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import queue
import secrets
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import fastapi
import httpx
from fastapi.responses import JSONResponse

from tau2jax.data.chat import ChatFormat
from tau2jax.inference.chat_template import sglang_messages
from tau2jax.inference.engine import UNKNOWN_VERSION, GenerateResult, SamplingParams, settle
from tau2jax.inference.sglang_rules import (API_KEY_ENV, HEALTH_CHECK_TIMEOUT_S, INPUT_MARGIN, ModelUpdateLock, SGLangRules,
                                            template_tools)
from tau2jax.inference.weight_sync import LATEST, latest_version, load_hf_params, shm_base, version_dir

log = logging.getLogger(__name__)

# SGLang sampling_params keys we honour; the text-only ones affect "text", never the tokens.
_SAMPLING_KEYS = {"temperature", "top_p", "top_k", "max_new_tokens", "stop", "stop_token_ids",
                  "sampling_seed", "ignore_eos"}
_TEXT_ONLY_KEYS = {"skip_special_tokens", "no_stop_trim", "spaces_between_special_tokens"}


class RequestError(ValueError):
    """A bad request (HTTP 400); the message says which field is wrong."""


class FlushRefused(ValueError):
    """sglang 0.5.2x's answer to a weight update that raced a running request: weights swapped, 400."""


class EngineFailure(RuntimeError):
    """The engine raised while generating (HTTP 500: clients retry)."""


# -- batching ---------------------------------------------------------------------------------------


@dataclass
class _Item:
    ids: list[int]
    params: SamplingParams
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class Batcher:
    """The one thread that calls the engine. `submit` queues a prompt and returns a Future.

    `lock` is held for every engine call; a weight swap takes it too, so it happens between two
    batches, never under a running generation.

    An engine that batches itself (`engine.batches_itself`: JaxEngine's continuous scheduler) gets
    each request straight away (`engine.submit`, under `lock`: never beside a swap); no thread,
    no second queue. A swap then lands while rows run: they finish on the weights they began with
    and report that version (the engine's guarantee).
    """

    def __init__(self, engine, max_batch: int = 32, window_s: float = 0.005):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.engine = engine
        self.max_batch = max_batch
        self.window_s = window_s
        self.lock = threading.Lock()
        self.last_output_t = 0.0  # time.monotonic() of the last batch answered (SGLang's health check)
        self.direct = getattr(engine, "batches_itself", False) is True  # (a Mock engine: False)
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="engine-batcher", daemon=True)
        if not self.direct:
            self._thread.start()

    def _answered(self, future: concurrent.futures.Future) -> None:
        if future.exception() is None:
            self.last_output_t = time.monotonic()

    def submit(self, ids: list[int], params: SamplingParams) -> concurrent.futures.Future:
        if self.direct:
            try:
                with self.lock:
                    future = self.engine.submit(ids, params)
            except Exception as e:
                future = concurrent.futures.Future()
                future.set_exception(e)
            future.add_done_callback(self._answered)
            return future
        item = _Item(ids, params)
        self._queue.put(item)
        return item.future

    def pending(self) -> int:
        """Prompts queued and not yet taken into a batch."""
        return self.engine.pending() if self.direct else self._queue.qsize()

    def close(self) -> None:
        if self.direct:
            return
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while (first := self._queue.get()) is not None:
            batch, stop = [first], False
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                try:  # what is already queued is taken even after the window has closed
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._serve(batch)
            if stop:
                return

    def _serve(self, batch: list[_Item]) -> None:
        # Requests are validated before they are queued (`Server.validate`), so an exception here is
        # the engine's, not one prompt's: every request of the batch fails with it (HTTP 500, retried).
        try:
            with self.lock:
                results = self.engine.generate([b.ids for b in batch], [b.params for b in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"engine returned {len(results)} results for {len(batch)} prompts")
        except Exception as e:
            for b in batch:
                settle(b.future, error=e)
            return
        self.last_output_t = time.monotonic()
        for b, r in zip(batch, results):
            settle(b.future, r)


# -- request parsing ----------------------------------------------------------------------------------


def _number(d: dict, key: str, default, kind):
    """d[key] as `kind` (default when absent or null); a bool, a string, a fraction or a non-finite
    integer is a 400 (a NaN or infinite float goes on to `verify_sampling`, which refuses it in SGLang's words)."""
    value = d.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (kind is int and (not math.isfinite(value) or value != int(value))):
        raise RequestError(f"{key} must be a finite {'integer' if kind is int else 'number'}, got {value!r}")
    return kind(value)


def verify_sampling(temperature: float, top_p: float, top_k: int, max_new_tokens: int,
                    min_p: float | None = None, repetition_penalty: float | None = None) -> None:
    """SGLang's `SamplingParams.verify` (sglang/srt/sampling/sampling_params.py; 0.5.23's wording,
    whose temperature check also refuses NaN and infinities), on the values as sent (top_k -1 = off).
    Each failure is a 400 naming the parameter, its range and the value."""
    if not math.isfinite(temperature) or temperature < 0.0:
        raise RequestError(f"temperature must be a non-negative finite number, got {temperature}.")
    if not 0.0 < top_p <= 1.0:
        raise RequestError(f"top_p must be in (0, 1], got {top_p}.")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise RequestError(f"min_p must be in [0, 1], got {min_p}.")
    if top_k != -1 and top_k < 1:
        raise RequestError(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
    if repetition_penalty is not None and not 0.0 < repetition_penalty <= 2.0:
        raise RequestError(f"repetition_penalty must be in (0, 2] (1.0 = no penalty), got {repetition_penalty}.")
    if max_new_tokens < 0:
        raise RequestError(f"max_new_tokens must be at least 0, got {max_new_tokens}.")


def verify_tools(tools) -> list | None:
    """The request's "tools" as SGLang's pydantic `ChatCompletionRequest.tools: List[Tool]` takes
    them (sglang/srt/entrypoints/openai/protocol.py: Tool {type: str = "function", function:
    Function {name: str, description: str | None, parameters: object | None, strict: bool}}), with
    OpenAI's one type, "function": anything else is a 400 naming the tool. None/[]: no tools."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise RequestError(f"tools must be a list of {{\"type\": \"function\", \"function\": {{\"name\": ...}}}} "
                           f"objects, got {type(tools).__name__} {tools!r:.80}")
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise RequestError(f"tools[{i}] must be an object, got {t!r:.80}")
        if t.get("type", "function") != "function":
            raise RequestError(f"tools[{i}].type must be \"function\", got {t.get('type')!r:.80}")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise RequestError(f"tools[{i}].function must be an object with a name, got {fn!r:.80}")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError(f"tools[{i}].function.name must be a non-empty string, got {name!r:.80}")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise RequestError(f"tools[{i}].function.description must be a string, got {fn['description']!r:.80}")
        if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
            raise RequestError(f"tools[{i}].function.strict must be a boolean, got {fn['strict']!r:.80}")
    return tools or None


def _strings(value, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise RequestError(f"{key} must be a non-empty string or a list of them, got {value!r}")
    return tuple(value)


def _token_ids(value, key: str, vocab_size: int) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise RequestError(f"{key} must be a list of integer token ids")
    bad = [t for t in value if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"{key} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    return value


@dataclass
class _Request:
    ids: list[int]
    params: SamplingParams
    no_stop_trim: bool
    skip_special_tokens: bool


class Server:
    """The engine + tokenizer behind the app: parsing, engine calls, response building."""

    def __init__(self, engine, tokenizer, *, model_path: str = "", max_batch: int = 32,
                 batch_window_s: float = 0.005, default_max_tokens: int | None = 1024,
                 context_length: int | None = None, rules: SGLangRules | None = None,
                 served_model_name: str = "", request_log: str | None = None, flush_lag_s: float = 0.0,
                 die_on_engine_failure: bool = False, chat_template=None, chat_defaults: dict | None = None,
                 weights_roots=None, api_key: str = ""):
        self.engine = engine
        self.rules = rules or SGLangRules()
        self.update_lock = ModelUpdateLock()
        self.served_model_name = served_model_name or model_path
        self.tokenizer = tokenizer
        self.chat = ChatFormat(tokenizer)
        self.model_path = model_path
        # a chat request without max_tokens: at most this many (None: as SGLang, up to the context)
        self.default_max_tokens = default_max_tokens
        # chat prompts: the model's own template (`chat_template.HFChatTemplate`, or one whose render
        # raises: the dir has none), as SGLang; None: the built-in Qwen3-2507 `ChatFormat`
        self.chat_template = chat_template
        # what a chat request's omitted temperature/top_p/top_k/min_p/repetition_penalty become
        # (`sglang_rules.chat_sampling_defaults`); None: /generate's defaults (1.0, 1.0, off)
        self.chat_defaults = chat_defaults
        self.batcher = Batcher(engine, max_batch, batch_window_s)
        self.running = 0  # requests between arrival and response (SGLang's running + waiting)
        # JSONL, a line per /generate result: which weights served which tokens (the rehearsal's tally)
        self.request_log = request_log
        # SGLang's scheduler keeps a finished request in its running batch one more iteration: > 0
        # models that window and the flush race it opens for a weight update (sglang#14062), as the
        # version in `rules` fails it (update_weights_from_disk below)
        self.flush_lag_s = flush_lag_s
        # SGLang's scheduler dying takes the server down: the process exits instead of answering 500
        self.die_on_engine_failure = die_on_engine_failure
        # the model's EOS ids (Qwen3 generation_config.json)
        self.eos_ids = tokenizer.end_of_turn_ids
        cfg = getattr(engine, "cfg", None)
        self.vocab_size = cfg.vocab_size if cfg is not None else tokenizer.vocab_size
        # SGLang's context length (`max_model_len` in /v1/models); None = unlimited (ScriptedEngine)
        self.context_length = context_length or getattr(engine, "max_seq_len", None)
        # update_weights_from_disk loads only under these dirs (None: anywhere; the CLI's --weights-root)
        self.weights_roots = None if weights_roots is None else [os.path.abspath(r) for r in weights_roots]
        # every endpoint but /health needs "Authorization: Bearer <api_key>" ("": none), as SGLang's --api-key
        self.api_key = api_key
        self.loaded_versions: dict[str, int] = {}  # publish dir -> the last weight_version loaded from it

    def validate(self, ids: list[int], params: SamplingParams) -> None:
        """SGLang's per-request length checks (its tokenizer manager's and its scheduler's, same
        words), run before a request is queued so that a bad one fails alone (HTTP 400) and never
        reaches a batch."""
        if not ids:
            raise RequestError("empty prompt")
        c = self.context_length
        if c is None:
            return
        if len(ids) >= c:
            raise RequestError(f"The input ({len(ids)} tokens) is longer than the model's context length ({c} tokens).")
        if len(ids) + params.max_new_tokens >= c:
            raise RequestError(
                f"Requested token count exceeds the model's maximum context length of {c} tokens. You requested "
                f"a total of {len(ids) + params.max_new_tokens} tokens: {len(ids)} tokens from the input messages "
                f"and {params.max_new_tokens} tokens for the completion. Please reduce the number of tokens in "
                f"the input messages or the completion to fit within the limit.")
        if len(ids) >= c - INPUT_MARGIN:  # the scheduler's check, after the tokenizer manager's two
            raise RequestError(f"Input length ({len(ids)} tokens) exceeds the maximum allowed length "
                               f"({c - INPUT_MARGIN} tokens). Use a shorter input or enable --allow-auto-truncate.")

    # /generate

    def parse_sampling(self, sp: dict) -> SamplingParams:
        if not isinstance(sp, dict):
            raise RequestError(f"sampling_params must be an object, got {sp!r}")
        unknown = set(sp) - _SAMPLING_KEYS - _TEXT_ONLY_KEYS
        if unknown:
            raise RequestError(f"unsupported sampling_params {sorted(unknown)}; supported: "
                               f"{sorted(_SAMPLING_KEYS | _TEXT_ONLY_KEYS)}")
        stop_ids = tuple(_token_ids(sp.get("stop_token_ids") or [], "stop_token_ids", self.vocab_size))
        # As in SGLang: the EOS ids always stop, and ignore_eos turns off every stop token (ids too).
        stop_ids = () if sp.get("ignore_eos") else stop_ids + tuple(t for t in self.eos_ids if t not in stop_ids)
        seed = sp.get("sampling_seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise RequestError(f"sampling_seed must be an integer, got {seed!r}")
        temperature, top_p = _number(sp, "temperature", 1.0, float), _number(sp, "top_p", 1.0, float)
        top_k, max_new_tokens = _number(sp, "top_k", -1, int), _number(sp, "max_new_tokens", 128, int)  # SGLang's defaults
        verify_sampling(temperature, top_p, top_k, max_new_tokens)
        return SamplingParams(
            temperature=temperature, top_p=top_p,
            top_k=max(0, top_k),  # SGLang: top_k -1 = off; ours: 0 = off
            max_new_tokens=max_new_tokens,
            stop_token_ids=stop_ids,
            stop_strings=_strings(sp.get("stop"), "stop"),
            seed=self.rules.seed(seed),
        )

    def parse_generate(self, body: dict) -> tuple[list[_Request], bool]:
        """-> (one request per prompt, whether the input was a batch)."""
        if body.get("stream"):
            raise RequestError("stream=true is not supported; send stream=false")
        if ("input_ids" in body) == ("text" in body):
            raise RequestError("give exactly one of input_ids or text")
        if "text" in body:
            texts = body["text"]
            batched = isinstance(texts, list)
            texts = texts if batched else [texts]
            if not texts or not all(isinstance(t, str) for t in texts):
                raise RequestError("text must be a string or a non-empty list of strings")
            prompts = [self.tokenizer.encode(t) for t in texts]
        else:
            ids = body["input_ids"]
            batched = isinstance(ids, list) and bool(ids) and isinstance(ids[0], list)
            prompts = ids if batched else [ids]
            for i, p in enumerate(prompts):
                _token_ids(p, f"input_ids[{i}]" if batched else "input_ids", self.vocab_size)
        sps = body.get("sampling_params") or {}
        if isinstance(sps, list):
            if len(sps) != len(prompts):
                raise RequestError(f"{len(sps)} sampling_params for {len(prompts)} prompts")
        else:
            sps = [sps] * len(prompts)
        reqs = []
        for p, sp in zip(prompts, sps):
            params = self.parse_sampling(sp)
            self.validate(p, params)
            reqs.append(_Request(p, params, bool(sp.get("no_stop_trim", False)),
                                 bool(sp.get("skip_special_tokens", True))))
        return reqs, batched

    async def run(self, ids: list[int], params: SamplingParams) -> GenerateResult:
        r = await asyncio.wrap_future(self.batcher.submit(ids, params))
        if self.rules.length_before_stop and r.finish_reason == "stop" and len(r.output_ids) >= params.max_new_tokens:
            r = dataclasses.replace(r, finish_reason="length", stop_reason=None)  # SGLang 0.5.3's order
        return r

    async def health(self) -> bool:
        """SGLang's /health: a one-token generation queued like any request (behind a weight
        update); healthy once any output arrives after the check began (polled each second)."""
        if not self.rules.health_generates:
            return True
        tic = time.monotonic()

        async def one_token():
            async with self.update_lock.shared():
                await self.run([0], SamplingParams(temperature=0.0, max_new_tokens=1))

        task = asyncio.create_task(one_token())
        try:
            while time.monotonic() < tic + HEALTH_CHECK_TIMEOUT_S:
                await asyncio.sleep(1.0)
                if self.batcher.last_output_t > tic:
                    return True
            return False
        finally:
            task.cancel()

    def generate_response(self, req: _Request, r: GenerateResult, return_logprob: bool, t0: float) -> dict:
        out = list(r.output_ids)
        if r.finish_reason == "stop" and isinstance(r.stop_reason, int) and not req.no_stop_trim:
            out = out[:-1]  # SGLang leaves a matched stop token out of the text
        text = self.tokenizer.decode(out, skip_special_tokens=req.skip_special_tokens)
        if r.finish_reason == "stop" and isinstance(r.stop_reason, str) and not req.no_stop_trim:
            cut = text.find(r.stop_reason)
            text = text if cut < 0 else text[:cut]
        meta = {
            "id": uuid.uuid4().hex,
            "finish_reason": finish_reason_json(r),
            "prompt_tokens": len(req.ids),
            "completion_tokens": len(r.output_ids),
            "cached_tokens": 0,
            "weight_version": self.version_text(r.policy_version),
            "e2e_latency": time.perf_counter() - t0,
        }
        if return_logprob:
            meta["output_token_logprobs"] = [[float(lp), int(t), None] for lp, t in zip(r.logprobs, r.output_ids)]
        return {"text": text, "output_ids": list(r.output_ids), "meta_info": meta}

    def version_text(self, version: int) -> str:
        """The served weight version as SGLang names it: "default" until an update names one (the
        engine then holds UNKNOWN_VERSION), else the integer."""
        return "default" if version == UNKNOWN_VERSION else str(version)

    def log_served(self, reqs: list[_Request], results: list[GenerateResult], in_flight: int,
                   endpoint: str = "/generate", sampling: dict | None = None) -> None:
        """A line per result; `sampling` (chat): the sampling parameters SGLang would have used."""
        if self.request_log is None:
            return
        extra = {} if sampling is None else {"sampling": sampling}
        lines = "".join(json.dumps({"t": time.time(), "endpoint": endpoint,
                                    "weight_version": self.version_text(r.policy_version), "in_flight": in_flight,
                                    "prompt": token_digest(q.ids), "prompt_tokens": len(q.ids),
                                    "output": token_digest(r.output_ids), "completion_tokens": len(r.output_ids),
                                    **extra}) + "\n"
                        for q, r in zip(reqs, results))
        with open(self.request_log, "a") as f:  # one write per request batch: replicas append whole lines
            f.write(lines)

    # /v1/chat/completions

    def parse_chat(self, body: dict) -> tuple[list[int], SamplingParams, set[str], dict]:
        """-> (prompt ids, sampling params, the tool names whose calls are parsed out of the reply,
        the sampling parameters as SGLang would use them: what the request log records)."""
        if body.get("stream"):
            raise RequestError("stream=true is not supported; send stream=false")
        if body.get("n", 1) != 1:
            raise RequestError("only n=1 is supported")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list")
        tools = verify_tools(body.get("tools"))
        tool_choice = body.get("tool_choice") or "auto"
        if tool_choice not in ("auto", "none"):
            raise RequestError(f"tool_choice {tool_choice!r} is not supported (use auto or none)")
        try:
            if self.chat_template is not None:  # as SGLang: the model's template; tool_choice none: no tools
                text = self.chat_template.render(
                    sglang_messages(messages), template_tools(self.rules.version, tools if tool_choice == "auto" else None),
                    add_generation_prompt=True)
                ids = self.tokenizer.encode(text)
            else:
                ids, _ = self.chat.render([_chat_message(m) for m in messages], tools, add_generation_prompt=True)
        except (KeyError, TypeError, ValueError) as e:
            raise RequestError(f"cannot render messages: {e}") from None
        # 0.5.3 serving_chat.py _build_sampling_params: max_tokens or max_completion_tokens; 0.5.23
        # protocol.py to_sampling_params the other way round
        first, second = ("max_tokens", "max_completion_tokens") if self.rules.is_0_5_3 else \
            ("max_completion_tokens", "max_tokens")
        max_tokens = body.get(first) or body.get(second)
        if max_tokens is None:
            # SGLang: max_new_tokens None runs to the context: scheduler.py init_req_max_new_tokens,
            # min(1 << 30, max_req_len - len - 1) with max_req_len = context - 1 (tp_worker.py)
            room = None if self.context_length is None else self.context_length - 2 - len(ids)
            caps = [c for c in (self.default_max_tokens, room) if c is not None]
            max_tokens = max(1, min(caps)) if caps else 1 << 30
        sp = {"max_new_tokens": max_tokens, "stop": body.get("stop")}
        defaults = self.chat_defaults or {}
        sampling = {}
        for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            value = body.get(key)
            value = defaults.get(key) if value is None else value
            if value is not None:
                sampling[key] = value
                if key in ("temperature", "top_p", "top_k"):  # the engine has no min_p, repetition_penalty
                    sp[key] = value
        # what the engine does not sample with is still checked as SGLang checks it (the rest: parse_sampling)
        extra = {k: _number(sampling, k, None, float) for k in ("min_p", "repetition_penalty")}
        verify_sampling(1.0, 1.0, -1, 0, **extra)
        # 0.5.3's chat never passes the request's seed on (its sampling_seed stays 42)
        if body.get("seed") is not None and not (self.chat_template is not None and self.rules.is_0_5_3):
            sp["sampling_seed"] = body["seed"]
        params = self.parse_sampling(sp)
        self.validate(ids, params)
        sampling["max_new_tokens"] = params.max_new_tokens
        names = {t.get("function", {}).get("name") for t in tools or () if isinstance(t, dict)}
        return ids, params, names if tool_choice == "auto" else set(), sampling

    def chat_response(self, body: dict, prompt: list[int], r: GenerateResult, tool_names: set[str]) -> dict:
        if r.finish_reason == "abort":  # OpenAI has no "abort": a 500 makes the client retry
            raise EngineFailure(f"the engine aborted the request: {r.stop_reason}")
        out = list(r.output_ids)
        if r.finish_reason == "stop" and isinstance(r.stop_reason, int):
            out = out[:-1]
        text = self.tokenizer.decode(out, skip_special_tokens=False)
        if r.finish_reason == "stop" and isinstance(r.stop_reason, str):
            text = text[: text.find(r.stop_reason)] if r.stop_reason in text else text
        content, calls, as_calls = self.rules.tool_calls(text, tool_names) if tool_names else (text, None, False)
        message = {"role": "assistant", "content": content or None}
        if calls is not None:
            message["tool_calls"] = calls
        # As SGLang: only a stop becomes "tool_calls"; a reply cut by the length limit stays "length"
        finish = "tool_calls" if as_calls and r.finish_reason == "stop" else r.finish_reason
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", self.model_path),
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(r.output_ids),
                      "total_tokens": len(prompt) + len(r.output_ids)},
        }

    # /update_weights_from_disk

    def check_weights_path(self, model_path: str) -> None:
        """A 400 unless `model_path` lies under one of `weights_roots` (None: anywhere), both as
        written (.. resolved) and with its symlinks resolved. The refusal is the same words whether
        the path exists or not: it tells a caller nothing about the filesystem outside the roots."""
        if self.weights_roots is None:
            return

        def under(path, root):
            return path == root or path.startswith(root.rstrip(os.sep) + os.sep)

        lexical, real = os.path.abspath(model_path), os.path.realpath(model_path)
        if not any(under(lexical, os.path.abspath(r)) and under(real, os.path.realpath(r)) for r in self.weights_roots):
            raise RequestError(f"model_path {model_path!r} is outside the server's weights root "
                               f"({', '.join(self.weights_roots)}; --weights-root): refused")

    def check_version_order(self, model_path: str, version: int) -> str:
        """Our rule (SGLang takes any order): a stale or replayed push cannot put old weights back.
        In a publish dir (weight_sync: a `LATEST` file) only the version LATEST names loads, so a
        resumed run, which republishes its checkpoint's older step and rewinds LATEST, is followed
        by a server that kept running. Elsewhere a dir's versions only move forward. The same version
        reloads (SGLangEngine.reload, a re-push after a failed one); another dir has its own sequence
        (the pipeline's evals publish steps 0, 2, 5, 7 under {workdir}/served, GRPO its 0, 1, ...).
        -> the publish dir."""
        real = os.path.realpath(model_path)
        pub = os.path.dirname(real)
        try:
            newest = latest_version(pub)
        except ValueError:
            newest = None
        if newest is not None:
            if version != newest or real != os.path.realpath(version_dir(pub, newest)):
                raise RequestError(f"weight_version {version} at {model_path} is not {version_dir(pub, newest)}, "
                                   f"the version {pub}/{LATEST} names: only a publish dir's newest version loads")
            return pub
        last = self.loaded_versions.get(pub)
        if last is not None and version < last:
            raise RequestError(f"weight_version {version} is older than weight_version {last}, the last loaded from "
                               f"{pub}: a publish dir's versions only move forward (the same version reloads)")
        return pub

    def update_weights_from_disk(self, model_path: str, version: int) -> str:
        # a finished request still in the running batch when the update arrives (SGLang's scheduler
        # takes the update on its next iteration, then loads, then fails the flush): judged on
        # arrival, not after the load, which on a loaded CPU can outlast the window
        racing = self.flush_lag_s > 0 and self.running > 0
        pub = self.check_version_order(model_path, version)
        try:
            params, cfg = load_hf_params(model_path)
        except Exception as e:  # noqa: BLE001  missing dir, bad config, truncated safetensors (safetensors'
            # own error is neither an OSError nor a ValueError): the files' fault, a 400, nothing swapped
            raise RequestError(f"cannot load {model_path}: {type(e).__name__}: {e}") from None
        engine_cfg = getattr(self.engine, "cfg", None)
        if engine_cfg is not None and cfg != engine_cfg:
            raise RequestError(f"{model_path}: model config {cfg} differs from the served model's {engine_cfg}")
        if racing and self.rules.is_0_5_3:  # scheduler_update_weights_mixin.update_weights_from_disk
            logging.getLogger(__name__).error("AssertionError: Cache flush failed after updating weights "
                                              "(sglang 0.5.3's scheduler dies; stand-in: the server exits)")
            os._exit(1)
        with self.batcher.lock:  # a health check's generation may still be in the batcher
            # 0.5.2x (weight_updater.flush_cache_after_weight_update): swapped, then refused, no version bump
            self.engine.update_weights(params, self.engine.policy_version if racing else version)
        self.model_path = self.served_model_name = model_path  # as SGLang (tokenizer_manager.py)
        if not racing:
            self.loaded_versions[pub] = version
        if racing:
            raise FlushRefused("Weights were updated, but the cache was not flushed because requests are still "
                               "running or queued. Retract or finish them, then call /flush_cache.")
        return f"loaded {model_path} as policy version {version}"


def token_digest(ids) -> str:
    """A short, stable name of a token sequence (request logs and what reads them)."""
    return hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()[:16]


def _chat_message(m: dict) -> dict:
    """OpenAI message -> the dict ChatFormat renders (content parts joined, "developer" = system)."""
    if not isinstance(m, dict):
        raise TypeError(f"a message must be an object, got {m!r}")
    m = dict(m)
    if m.get("role") == "developer":
        m["role"] = "system"
    if isinstance(m.get("content"), list):
        m["content"] = "".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))
    return m


def finish_reason_json(r: GenerateResult) -> dict:
    """SGLang's finish_reason object for a result."""
    if r.finish_reason == "stop":
        return {"type": "stop", "matched": r.stop_reason}
    if r.finish_reason == "length":
        return {"type": "length", "length": len(r.output_ids)}
    return {"type": "abort", "message": str(r.stop_reason or "aborted by the engine")}


# -- app ------------------------------------------------------------------------------------------------


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "BadRequestError" if status < 500
                                   else "InternalServerError", "code": status}}, status_code=status)


async def _json_body(request: fastapi.Request) -> dict:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":  # SGLang answers 400 too (curl -d sends form encoding)
        raise RequestError(f"Content-Type must be application/json, got {media_type or 'none'!r} "
                           "(curl: -H 'Content-Type: application/json')")
    try:
        body = await request.json()
    except ValueError as e:
        raise RequestError(f"request body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    return body


def create_app(server: Server) -> fastapi.FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        server.batcher.close()

    app = fastapi.FastAPI(title="tau2jax engine server", lifespan=lifespan)

    if server.api_key:
        @app.middleware("http")
        async def authentication(request: fastapi.Request, call_next):
            # SGLang's --api-key (0.5.3 utils/common.py add_api_key_middleware, 0.5.23 utils/auth.py
            # decide_request_auth): OPTIONS and /health*, /metrics pass; everything else needs the key
            path = request.url.path
            if request.method == "OPTIONS" or path.startswith(("/health", "/metrics")):
                return await call_next(request)
            scheme, _, token = (request.headers.get("Authorization") or "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), server.api_key.encode()):
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
            return await call_next(request)

    @app.exception_handler(RequestError)
    async def bad_request(_req, e: RequestError):
        return _error(400, str(e))

    @app.exception_handler(EngineFailure)
    async def engine_failure(_req, e: EngineFailure):
        log.warning("engine failure: %s", e)
        return _error(500, str(e))

    async def generate_many(reqs: list[_Request], log: bool = False, **log_extra) -> list[GenerateResult]:
        server.running += len(reqs)
        in_flight = server.running
        try:  # requests were validated before queuing: what the engine raises is its own failure
            results = await asyncio.gather(*(server.run(r.ids, r.params) for r in reqs))
            if log:
                server.log_served(reqs, results, in_flight, **log_extra)
            return results
        except Exception as e:
            if server.die_on_engine_failure:  # SGLang: a scheduler exception ends the server process
                logging.getLogger(__name__).error("scheduler failure, exiting: %s: %s", type(e).__name__, e)
                os._exit(1)
            raise EngineFailure(f"{type(e).__name__}: {e}") from e
        finally:
            def done(n=len(reqs)):
                server.running -= n
            if server.flush_lag_s > 0:  # still in the scheduler's running batch for a moment
                asyncio.get_running_loop().call_later(server.flush_lag_s, done)
            else:
                done()

    @app.get("/health")
    async def health():
        return fastapi.Response(status_code=200 if await server.health() else 503)

    @app.get("/get_model_info")
    async def model_info():
        return {"model_path": server.model_path, "tokenizer_path": server.tokenizer.path,
                "is_generation": True, "weight_version": server.version_text(server.engine.policy_version),
                "max_batch": server.batcher.max_batch}

    # SGLang's load reports (the push waits for 0 before updating weights): 0.5.3's /get_load,
    # 0.5.2x's /v1/loads (sglang_client.IDLE_ENDPOINTS)
    @app.get("/get_load")
    async def get_load():
        return [{"dp_rank": 0, "num_reqs": server.running, "num_waiting_reqs": 0, "num_tokens": 0}]

    @app.get("/v1/loads")
    async def loads():
        return {"loads": [{"dp_rank": 0, "num_running_reqs": server.running, "num_waiting_reqs": 0}]}

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():  # as SGLang's scheduler.flush_cache: refused while requests run
        ok = server.running == 0
        return fastapi.Response("Cache flushed.\n" if ok else "Cache not flushed: requests are running.\n",
                                status_code=200 if ok else 400)

    @app.get("/v1/models")
    async def models():  # SGLang's ModelCard: max_model_len is the context length it validates against
        card = {"id": server.served_model_name, "object": "model", "root": server.served_model_name,
                "owned_by": "tau2jax"}
        if server.context_length is not None:
            card["max_model_len"] = server.context_length
        return {"object": "list", "data": [card]}

    @app.post("/generate")
    async def generate(request: fastapi.Request):
        t0 = time.perf_counter()
        body = await _json_body(request)
        reqs, batched = server.parse_generate(body)
        async with server.update_lock.shared():
            results = await generate_many(reqs, log=True)
        out = [server.generate_response(q, r, bool(body.get("return_logprob")), t0) for q, r in zip(reqs, results)]
        return out if batched else out[0]

    @app.post("/v1/chat/completions")
    async def chat_completions(request: fastapi.Request):
        body = await _json_body(request)
        ids, params, tool_names, sampling = server.parse_chat(body)
        async with server.update_lock.shared():
            (result,) = await generate_many([_Request(ids, params, False, False)], log=True,
                                            endpoint="/v1/chat/completions", sampling=sampling)
        return server.chat_response(body, ids, result, tool_names)

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: fastapi.Request):
        body = await _json_body(request)
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            raise RequestError("model_path (a HF model directory) is required")
        version = body.get("weight_version")
        try:
            server.check_weights_path(path)
            try:  # as SGLang: no weight_version keeps the current one ("default" included)
                version = server.engine.policy_version if version is None else int(version)
            except (TypeError, ValueError):
                raise RequestError(f"weight_version must be an integer policy version, got {version!r}") from None
            if body.get("weight_version") is not None and version < 0:
                raise RequestError(f"weight_version must be a policy version >= 0, got {version}")
            # as SGLang: drains the requests in flight, holds new ones back, loads, swaps
            async with server.update_lock.exclusive():
                message = await asyncio.to_thread(server.update_weights_from_disk, path, version)
        except (FlushRefused, RequestError) as e:  # refused (root, version order, files): nothing swapped
            return JSONResponse({"success": False, "message": str(e)}, status_code=400)
        except (OSError, ValueError) as e:  # the engine refused the weights (shapes)
            return JSONResponse({"success": False, "message": f"{type(e).__name__}: {e}"}, status_code=400)
        return {"success": True, "message": message, "num_paused_requests": 0}

    return app


# -- running ------------------------------------------------------------------------------------------


class RunningServer:
    """A uvicorn server on a background thread (tests, in-process user simulators)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, ready_timeout_s: float = 60.0):
        import uvicorn

        # Binding here (port 0 = a free port) avoids the pick-a-port-then-bind race.
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self._uvicorn = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self._sock]},
                                        name="uvicorn", daemon=True)
        self._thread.start()
        wait_healthy(self.url, ready_timeout_s)

    def stop(self) -> None:
        self._uvicorn.should_exit = True
        self._thread.join()
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def wait_healthy(url: str, timeout_s: float, interval_s: float = 0.05) -> None:
    """Polls GET {url}/health until it answers 200; TimeoutError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            # SGLang's /health (SGLangRules.health_generates) takes >= 1 s and gives up after its own timeout
            if httpx.get(f"{url}/health", timeout=HEALTH_CHECK_TIMEOUT_S + 5).status_code == 200:
                return
        except httpx.TransportError as e:
            last = e
        time.sleep(interval_s)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s:.0f} s (last error: {last})")


def port_error(port: int) -> str | None:
    """Why `port` cannot be listened on (None: it can): uvicorn would log it and bind another."""
    return None if 1 <= port <= 65535 else f"--port {port} is outside 1..65535; pick a free port in that range"


def default_weights_root() -> str:
    """Where a trainer on this host publishes by default (`weight_sync.default_root`'s /dev/shm dir)."""
    return shm_base()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tau2jax.inference.server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="Orbax weights dir (checkpoints_tools.hf_to_orbax output)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--tokenizer", default="", help="HF dir with tokenizer.json (default: the shipped Qwen3 one)")
    p.add_argument("--max-batch", type=int, default=32, help="most prompts per engine call")
    p.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="how long the first queued prompt waits for others to join its batch")
    p.add_argument("--max-seq-len", type=int, default=8192, help="KV cache length (prompt + generated tokens)")
    p.add_argument("--scheduler", default="static", choices=["static", "continuous"],
                   help="the engine's batching: static batches, or rows joining and leaving the running batch")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights and compute dtype (bfloat16 on GPUs)")
    p.add_argument("--max-tokens", type=int, default=1024, help="chat completions' default max_tokens")
    p.add_argument("--log-level", default="info")
    p.add_argument("--weights-root", action="append", default=None,
                   help="update_weights_from_disk loads only under this dir (repeatable; default: "
                        f"{default_weights_root()}, where a trainer on this host publishes)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV, ""),
                   help=f"require 'Authorization: Bearer KEY' on every endpoint but /health, as SGLang's "
                        f"--api-key (default: ${API_KEY_ENV}; empty: no key)")
    args = p.parse_args(argv)
    if (bad := port_error(args.port)) is not None:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from tau2jax.data.tokenizer import load_tokenizer
    from tau2jax.inference.jax_engine import JaxEngine

    try:
        tokenizer = load_tokenizer(args.tokenizer)
        engine = JaxEngine.from_checkpoint(args.checkpoint, dtype=args.dtype, compute_dtype=args.dtype,
                                           tokenizer=tokenizer, max_seq_len=args.max_seq_len,
                                           max_batch=args.max_batch, scheduler=args.scheduler)
    except (OSError, ValueError) as e:  # missing/invalid checkpoint or tokenizer: say which
        print(f"error: {e}", file=sys.stderr)
        return 2
    server = Server(engine, tokenizer, model_path=args.checkpoint, max_batch=args.max_batch,
                    batch_window_s=args.batch_window_ms / 1000, default_max_tokens=args.max_tokens,
                    weights_roots=args.weights_root or [default_weights_root()], api_key=args.api_key)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
