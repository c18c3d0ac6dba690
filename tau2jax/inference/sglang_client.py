"""`SGLangEngine`: the Engine protocol over HTTP, against `python -m sglang.launch_server` or our
own `python -m tau2jax.inference.server` (same API).

    engine = SGLangEngine("http://127.0.0.1:30000", concurrency=8)
    engine.wait_ready(600)
    [res] = engine.generate([prompt_ids], SamplingParams(temperature=0.8, stop_token_ids=(im_end,)))

Token in, token out: prompts go as `input_ids`, and the sampled ids and their log-probs come from
`meta_info.output_token_logprobs` (so the stop token is included, as the protocol requires), never
from re-tokenized text.

Semantics to know on SGLang (>= 0.5.3: `sampling_seed` needs it, and is honoured only by a server
launched with `--enable-deterministic-inference`; `launch/gpu_node.sh` checks the version):
- Log-probs are SGLang's `output_token_logprobs`: log_softmax(logits / T) of the sampled token,
  before top-p/top-k truncation; exactly `GenerateResult.logprobs`' convention.
- The model's EOS ids (generation_config.json) always stop generation, besides `stop_token_ids`
  (SGLang's `ignore_eos` would disable both, so it is never sent). Our server does the same.
- Context: SGLang rejects (400) a prompt + max_new_tokens that reaches its context length. The
  client reads that length once (`max_model_len` of GET /v1/models), caps max_new_tokens to the
  room left, and raises `ContextLengthError` without a request for a prompt SGLang's scheduler
  would refuse (>= context length - INPUT_MARGIN).
- Finish: `{"type": "abort"}` and SGLang's NaN stop (`{"type": "stop", "matched": "NaN happened"}`)
  are finish_reason "abort" (an infrastructure failure), never a stop.
- `policy_version` of a result is the server's `weight_version` when it is an integer (both servers
  report it per request, so a result is attributed to the weights that produced it even while a
  sync races with it), else UNKNOWN_VERSION (SGLang's "default" before its first update: a restarted
  server's start weights, never trained as on-policy; the learner re-syncs). A weight push aborts nothing:
  SGLang's `update_weights_from_disk` lets running requests finish on the old weights, swaps, and
  stamps one server-wide `weight_version` on what it serves after, so an episode in flight continues
  across a push, each turn carries the version that served it, and the learner judges staleness per
  sample (`rl.staleness`).

Failures: connection errors, timeouts and 5xx are retried with exponential backoff (generation has
no side effects); 4xx are the caller's mistake and raise `EngineRequestError` at once. When retries
run out, `EngineUnavailableError` is raised; the episode runner records it as an infrastructure
failure. A thread-safe pooled `httpx.Client` plus a semaphore bound the requests in flight; bodies
go as JSON with `Content-Type: application/json` (SGLang rejects other content types).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time

import httpx

from tau2jax.inference.engine import UNKNOWN_VERSION, ContextLengthError, GenerateResult, SamplingParams, per_prompt
from tau2jax.inference.sglang_rules import API_KEY_ENV, INPUT_MARGIN
from tau2jax.inference.weight_sync import ServedFromDisk


class EngineRequestError(ValueError):
    """The server rejected the request (HTTP 4xx): retrying cannot help."""


# SGLang's scheduler refuses a prompt of >= context_len - INPUT_MARGIN tokens with a 400 "Input length
# (N tokens) exceeds the maximum allowed length (M tokens)" (sglang_rules.py has the sources).
_CONTEXT_ERRORS = ("context length", "exceeds the maximum allowed length")

# SGLang's /health is a one-token generation queued behind the running batch and stalled during a
# weight update (sglang/srt/entrypoints/http_server.py, health_generate): seconds on a busy server,
# and it answers 503 itself after its own HEALTH_CHECK_TIMEOUT_S (20 s); a 4B reload takes longer.
HEALTH_TIMEOUT_S = 60.0
IDLE_POLL_S = 0.05
# Where a server says how many requests it runs or queues, per DP rank (update_weights waits for 0):
# sglang 0.5.3 GET /get_load -> [{"num_reqs" (running + waiting), "num_waiting_reqs", ...}]
# (managers/scheduler.py get_load); 0.5.2x GET /v1/loads -> {"loads": [{"num_running_reqs",
# "num_waiting_reqs", ...}]} (entrypoints/v1_loads.py, managers/load_snapshot.py).
IDLE_ENDPOINTS = (("/v1/loads", lambda j: j.get("loads") or [], ("num_running_reqs", "num_waiting_reqs")),
                  ("/get_load", lambda j: j if isinstance(j, list) else [j], ("num_reqs",)))
CONTROL_CONNECTIONS = 4  # weight loads, version queries, health: a few at a time per server


class EngineUnavailableError(RuntimeError):
    """The server could not be reached or kept failing (5xx, timeouts) after all retries."""


def sampling_json(p: SamplingParams) -> dict:
    """SamplingParams -> SGLang's sampling_params."""
    sp = {
        "temperature": p.temperature,
        "top_p": p.top_p,
        "top_k": p.top_k if p.top_k > 0 else -1,  # SGLang: -1 = off
        "max_new_tokens": p.max_new_tokens,
        "stop_token_ids": list(p.stop_token_ids),
        # keep special tokens in "text" (we read ids, but the text is handy in logs)
        "skip_special_tokens": False,
    }
    if p.stop_strings:
        sp["stop"] = list(p.stop_strings)
    if p.seed is not None:
        sp["sampling_seed"] = p.seed
    return sp


# SGLang ends a request whose sampled id is outside the vocabulary (NaN logits) with this "stop",
# after overwriting that id with a stop token (schedule_batch.Req's vocab-boundary check).
NAN_MATCHED = "NaN happened"


def _finish(meta: dict) -> tuple[str, str | int | None]:
    fr = meta.get("finish_reason") or {}
    kind = fr.get("type")
    if kind == "stop" and fr.get("matched") != NAN_MATCHED:
        return "stop", fr.get("matched")
    if kind == "length":
        return "length", None
    if kind == "stop":
        return "abort", f"the server's logits were NaN ({NAN_MATCHED!r})"
    return "abort", fr.get("message") or f"finish_reason {fr!r}"


class SGLangEngine(ServedFromDisk):
    """`url`: the server; `policy_version`: the version it serves at start (see the module docstring).
    Weight pushes are published to `publication` (`weight_sync.ServedFromDisk`)."""

    kind = "sglang"
    synced_version: int | None = None  # until this client loads weights, the server's are its own

    def __init__(self, url: str, *, concurrency: int = 8, timeout_s: float = 300.0, max_retries: int = 3,
                 backoff_s: float = 0.5, max_backoff_s: float = 10.0, policy_version: int = 0,
                 publication=None, api_key: str | None = None):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.url = self.location = url.rstrip("/")
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.policy_version = policy_version
        self.publication = publication
        self._context_length: int | None = None
        self._context_known = False
        self._info_lock = threading.Lock()
        self.concurrency, self.timeout_s = concurrency, timeout_s
        self._gate = threading.Condition()  # weight updates hold new /generate calls (update_weights)
        self._held, self._inflight, self._drained_by = False, 0, 0.0
        self._idle_endpoint: str | None = None  # which load endpoint this server has ("" = none)
        self._sem = threading.BoundedSemaphore(concurrency)
        timeout = httpx.Timeout(timeout_s, connect=min(10.0, timeout_s))
        # the server's --api-key (SGLang: "Authorization: Bearer <key>"); None: $TAU2JAX_API_KEY; "": none
        api_key = os.environ.get(API_KEY_ENV, "") if api_key is None else api_key
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=self.url, timeout=timeout, headers=headers, limits=httpx.Limits(
            max_connections=concurrency, max_keepalive_connections=concurrency))
        # Control calls (weight loads, version queries, health) on their own connections, outside the
        # semaphore: they never queue behind the episodes' /generate calls.
        self._control = httpx.Client(base_url=self.url, timeout=timeout, headers=headers, limits=httpx.Limits(
            max_connections=CONTROL_CONNECTIONS, max_keepalive_connections=CONTROL_CONNECTIONS))

    def generate(self, input_ids: list[list[int]],
                 params: SamplingParams | list[SamplingParams]) -> list[GenerateResult]:
        if not input_ids:
            return []
        ps = self._fit_context(input_ids, per_prompt(params, len(input_ids)))
        batched = len(input_ids) > 1  # a single prompt uses SGLang's non-batch form
        body = {
            "input_ids": [list(map(int, x)) for x in input_ids] if batched else list(map(int, input_ids[0])),
            "sampling_params": [sampling_json(p) for p in ps] if batched else sampling_json(ps[0]),
            "return_logprob": True,
        }
        with self._generation_slot():
            out = self._request("POST", "/generate", body)
        outs = out if batched else [out]
        if not isinstance(outs, list) or len(outs) != len(input_ids):
            raise EngineUnavailableError(
                f"{self.url}/generate answered {len(outs)} results for {len(input_ids)} prompts")
        return [self._result(o, p) for o, p in zip(outs, ps)]

    def _result(self, out: dict, params: SamplingParams) -> GenerateResult:
        meta = out["meta_info"]
        pairs = meta.get("output_token_logprobs")
        if pairs is None:
            raise EngineUnavailableError(f"{self.url}/generate returned no output_token_logprobs")
        reason, matched = _finish(meta)
        ids = [int(t) for _, t, *_ in pairs]
        # SGLang 0.5.3 checks max_new_tokens before stop tokens (managers/schedule_batch.py
        # Req.check_finished), so a stop token sampled as the last allowed token reads "length";
        # later versions say "stop". The turn did end at its stop token: call it a stop either way.
        if reason == "length" and ids and ids[-1] in params.stop_token_ids:
            reason, matched = "stop", ids[-1]
        served = str(meta.get("weight_version", ""))
        return GenerateResult(
            output_ids=ids,
            logprobs=[float(lp) for lp, *_ in pairs],
            finish_reason=reason,
            policy_version=int(served) if served.isdigit() else UNKNOWN_VERSION,
            stop_reason=matched,
        )

    @property
    def context_length(self) -> int | None:
        """The server's context length (`max_model_len` of GET /v1/models; SGLang's
        model_config.context_len), read once; None when the server states none."""
        with self._info_lock:
            if not self._context_known:
                cards = self._request("GET", "/v1/models", control=True).get("data") or [{}]
                self._context_length = cards[0].get("max_model_len")
                self._context_known = True
        return self._context_length

    def _fit_context(self, input_ids: list[list[int]], ps: list[SamplingParams]) -> list[SamplingParams]:
        """Caps max_new_tokens to the room the context leaves: SGLang rejects (400) a request whose
        prompt + max_new_tokens reaches its context length. A prompt that leaves no room raises
        ContextLengthError before anything is sent."""
        c = self.context_length
        if c is None:
            return ps
        out = []
        for ids, p in zip(input_ids, ps):
            room = c - 1 - len(ids)  # SGLang accepts prompt + max_new_tokens < context length
            if len(ids) >= c - INPUT_MARGIN:  # (then room < INPUT_MARGIN: room < 1 is covered)
                raise ContextLengthError(f"prompt of {len(ids)} tokens reaches {self.url}'s input limit "
                                         f"(context length {c} - {INPUT_MARGIN} tokens)")
            out.append(p if p.max_new_tokens <= room else dataclasses.replace(p, max_new_tokens=room))
        return out

    def update_weights(self, path: str, version: int) -> None:
        """Makes the server load the HF checkpoint at `path` (a path on the server's machine) as
        policy `version` (`/update_weights_from_disk`), safe against SGLang's flush race
        (sgl-project/sglang#14062: an update that lands while a finished request still sits in the
        scheduler's running batch kills 0.5.3's scheduler, `assert flush_cache_success`, and makes
        0.5.23 answer 400 after the weights were swapped, without the version bump):

        1. hold: this client sends no new /generate and waits for its own to come back;
        2. wait until the server reports nothing running or queued (`IDLE_ENDPOINTS`);
        3. load; 4. verify that the server now names `version`; 5. flush the radix cache.

        Any failure raises, and the hold stays until a later update succeeds: no turn is sampled on
        weights the server cannot name (each held request waits up to the client's timeout, then
        fails as an infrastructure error). docs/gpu_serving.md cites the SGLang code."""
        with self._gate:
            self._held = True
            self._drained_by = time.monotonic() + self.timeout_s
            while self._inflight:
                if not self._gate.wait(max(0.0, self._drained_by - time.monotonic())):
                    raise EngineUnavailableError(f"{self.url}: /generate calls still running after "
                                                 f"{self.timeout_s:.0f} s; weight update not sent")
        self._wait_idle()
        out = self._request("POST", "/update_weights_from_disk",
                            {"model_path": str(path), "weight_version": str(version)}, control=True)
        if not out.get("success"):
            raise EngineRequestError(f"{self.url} could not load {path}: {out.get('message')}")
        served = str(self.model_info().get("weight_version", ""))
        if served != str(version):
            raise EngineRequestError(f"{self.url} loaded {path} but serves weight_version {served!r}, not {version}")
        r = self._control.post("/flush_cache")
        if r.status_code != 200:
            raise EngineRequestError(f"{self.url}/flush_cache refused ({r.status_code}): {r.text[:300]}")
        self.policy_version = self.synced_version = version
        with self._gate:
            self._held = False
            self._gate.notify_all()

    def _wait_idle(self) -> None:
        """Until the server has no request running or queued (its load endpoint; one it lacks is
        skipped): what SGLang's flush needs (scheduler.flush_cache: empty waiting queue and running batch)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            busy = self._server_busy()
            if not busy:
                return
            if time.monotonic() > deadline:
                raise EngineUnavailableError(f"{self.url} still runs {busy} request(s) after {self.timeout_s:.0f} s "
                                             "with this client holding its own: another client is using it?")
            time.sleep(IDLE_POLL_S)

    def _server_busy(self) -> int:
        """Requests the server runs or queues, over its DP ranks (0 when it has no load endpoint)."""
        for path, rows, fields in IDLE_ENDPOINTS:
            if self._idle_endpoint not in (None, path):
                continue
            r = self._control.get(path)
            if r.status_code == 404:
                continue
            if r.status_code >= 400:
                raise EngineUnavailableError(f"{self.url}{path} answered {r.status_code}: {r.text[:300]}")
            self._idle_endpoint = path
            loads = rows(r.json())
            return sum(int(load.get(f) or 0) for load in loads for f in fields)
        self._idle_endpoint = ""
        return 0

    @contextlib.contextmanager
    def _generation_slot(self):
        """A /generate call, unless a weight update holds them (then it waits, up to timeout_s)."""
        with self._gate:
            if self._held and not self._gate.wait_for(lambda: not self._held, self.timeout_s):
                raise EngineUnavailableError(f"{self.url}: generation held for {self.timeout_s:.0f} s by a weight "
                                             "update that has not succeeded (the learner re-syncs)")
            self._inflight += 1
        try:
            yield
        finally:
            with self._gate:
                self._inflight -= 1
                self._gate.notify_all()

    def health(self) -> bool:
        """True when /health answers 200 within HEALTH_TIMEOUT_S (503 while starting, a timeout:
        not ready)."""
        try:
            return self._control.get("/health", timeout=HEALTH_TIMEOUT_S).status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout_s: float = 600.0, interval_s: float = 0.5) -> None:
        """Polls /health until the server answers (model loading takes minutes on SGLang)."""
        deadline = time.monotonic() + timeout_s
        while not self.health():
            if time.monotonic() > deadline:
                raise EngineUnavailableError(f"{self.url}/health not ready after {timeout_s:.0f} s")
            time.sleep(interval_s)
        self.model_info()  # /health needs no key: a wrong or missing one fails here, in one line (401)

    def model_info(self) -> dict:
        return self._request("GET", "/get_model_info", control=True)

    def served_version(self) -> int | None:
        """The server's `weight_version` (/get_model_info): sees through a restart, which serves
        a version that is none of ours (-1). None when the server cannot be asked."""
        try:
            v = str(self.model_info().get("weight_version", ""))
        except (EngineUnavailableError, ValueError):  # down, or an answer that is not JSON
            return None
        return int(v) if v.isdigit() else UNKNOWN_VERSION

    def identity(self) -> dict:
        """The served policy as results are stamped: the server's `weight_version` when it is an
        integer, else this client's own; plus the server's `model_path` and raw `weight_version`."""
        info = self.model_info()
        served = str(info.get("weight_version", ""))
        version = int(served) if served.isdigit() else self.policy_version
        return {"policy_version": version, "engine.model_path": info.get("model_path"), "engine.weight_version": served}

    def close(self) -> None:
        self._client.close()
        self._control.close()

    def _request(self, method: str, path: str, body: dict | None = None, *, control: bool = False):
        error = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))
            try:
                if control:
                    r = self._control.request(method, path, json=body)
                else:
                    with self._sem:
                        r = self._client.request(method, path, json=body)
            except httpx.TransportError as e:  # refused, reset, timed out
                error = f"{type(e).__name__}: {e}"
                continue
            if r.status_code < 400:
                return r.json()
            if r.status_code == 401:  # SGLang's --api-key middleware (our server's too)
                raise EngineRequestError(f"{self.url}{path}: 401 Unauthorized: the server was started with --api-key; "
                                         f"give this client the same key (engine.api_key or ${API_KEY_ENV})")
            if r.status_code < 500:
                # SGLang (and our server) answer an over-long prompt with a 400 (_CONTEXT_ERRORS).
                if any(e in r.text.lower() for e in _CONTEXT_ERRORS):
                    raise ContextLengthError(f"{self.url}{path}: {r.text[:1000]}")
                raise EngineRequestError(f"{self.url}{path} rejected the request ({r.status_code}): {r.text[:1000]}")
            error = f"HTTP {r.status_code}: {r.text[:1000]}"
        raise EngineUnavailableError(
            f"{self.url}{path} failed after {self.max_retries + 1} attempt(s); last error: {error}")
