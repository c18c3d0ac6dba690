"""The built-in JAX inference engine: batched prefill + KV-cache decoding on `qwen3.forward_cached`.

Serving model
    Every `generate` / `submit` call puts its prompts on one queue; a worker thread takes up to
    `max_batch` queued requests at a time (whatever is waiting, after an optional `batch_wait_s`)
    and runs them as one static batch until every row has finished. So concurrent callers
    (episode threads, HTTP handlers) are batched together without coordinating, and the engine
    is safe to call from any thread. Requests queued while a batch runs go into the next one.

Shapes never depend on the traffic: the batch is padded to a bucket (1, 2, 4, ..., max_batch),
the prompt to a power of two (>= 16), and the KV cache is always `max_seq_len` long. So
prefill compiles once per (batch bucket, prompt bucket) and decode once per batch bucket;
`compile_counts` says how many times each was traced. Prefill runs the prompt through the cache
in `prefill_chunk`-token slices (attention scores are [chunk, max_seq_len], not [P, max_seq_len]).
Decoding runs `decode_chunk` steps per dispatch in a `lax.while_loop` (which exits as soon as
every row is done); stop token ids and max_new_tokens are checked on device, stop strings on the
host, and the host reads chunk i while the device already runs chunk i+1.

Sampling and log-probs: see `tau2jax.inference.sampling`. `logprobs` are under the distribution
actually sampled from (temperature, then top-k, then top-p); greedy (temperature 0) reports
log_softmax(logits) at the argmax. Each result also carries `raw_logprobs` (temperature 1, no
filtering). A request with a `seed` samples the same tokens whatever batch it lands in (its
keys are fold_in(key(seed), token index)); without one the engine draws a seed from its own RNG.

Stops: generation ends at the first stop token (kept in `output_ids`), or at the first token
whose detokenized text completes a stop string (that token is kept; needs `tokenizer`), with
finish_reason "stop" and `stop_reason` the id / string; else after max_new_tokens (clipped to
the cache: prompt + new <= max_seq_len) with "length". Every result carries the
`policy_version` of the weights that generated it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import queue
import threading
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tau2jax.models import qwen3
from tau2jax.models.configs import ModelConfig
from tau2jax.parallel.sharding import constrain
from tau2jax.inference import sampling
from tau2jax.inference.engine import ContextLengthError, GenerateResult, SamplingParams

MIN_PROMPT_BUCKET = 16
MIN_STOP_ID_SLOTS = 8  # stop-id table width; more stop ids round up to a power of two (a new shape)


@dataclasses.dataclass
class JaxGenerateResult(GenerateResult):
    # log_softmax(logits) at each sampled token: temperature 1, unfiltered.
    raw_logprobs: list[float] = dataclasses.field(default_factory=list)


class _Spec(NamedTuple):
    """Everything static about the compiled functions; engines with equal specs share them."""
    cfg: ModelConfig
    max_seq_len: int
    prefill_chunk: int
    decode_chunk: int
    compute_dtype: jnp.dtype
    cache_dtype: jnp.dtype


# (function name, spec) -> times traced. Tracing happens exactly when jit misses its cache.
_TRACES: collections.Counter = collections.Counter()


def _bucket(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << (n - 1).bit_length())


# --------------------------------------------------------------------------- jitted device code
# rows:  per-request constants [B]: temperature, top_k, top_p, seed, max_new, stop_ids [B, NS]
# state: cache, lengths (tokens in cache), last (sampled, not yet fed), done, n_gen [B]
# out:   tokens [k, B] (-1 where the row emitted nothing), logprobs, raw [k, B]


def _sample_next(logits, rows, n_gen):
    keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(rows["seed"], n_gen)
    return sampling.sample(keys, logits, rows["temperature"], rows["top_k"], rows["top_p"])


def _finished(rows, tok, n_gen):
    return jnp.any(tok[:, None] == rows["stop_ids"], axis=1) | (n_gen >= rows["max_new"])


@functools.partial(jax.jit, static_argnames="spec")
def _prefill(params, rows, tokens, prompt_lens, *, spec: _Spec):
    _TRACES["prefill", spec] += 1
    cfg = spec.cfg
    B, P = tokens.shape
    c = min(spec.prefill_chunk, P)  # both powers of two, so c divides P
    cache = qwen3.init_cache(cfg, B, spec.max_seq_len, spec.cache_dtype)
    cache = {n: constrain(a, ax) for (n, a), ax in zip(cache.items(), qwen3.cache_axes().values())}

    def chunk(carry, start):
        cache, last_hidden = carry
        pos = start + jnp.arange(c)
        hidden, cache = qwen3.forward_cached(
            params, cfg, jax.lax.dynamic_slice_in_dim(tokens, start, c, axis=1), cache,
            jnp.minimum(start, prompt_lens), pos[None] < prompt_lens[:, None],
            compute_dtype=spec.compute_dtype, return_hidden=True)
        idx = prompt_lens - 1 - start  # each row's last prompt token, if in this slice
        here = hidden[jnp.arange(B), jnp.clip(idx, 0, c - 1)]
        last_hidden = jnp.where(((idx >= 0) & (idx < c))[:, None], here, last_hidden)
        return (cache, last_hidden), None

    init = (cache, jnp.zeros((B, cfg.hidden_size), spec.compute_dtype))
    (cache, last_hidden), _ = jax.lax.scan(chunk, init, jnp.arange(0, P, c))
    logits = qwen3.logits_from_hidden(params, cfg, last_hidden)
    n_gen = jnp.zeros(B, jnp.int32)
    tok, lp, raw = _sample_next(logits, rows, n_gen)
    n_gen = n_gen + 1
    state = dict(cache=cache, lengths=prompt_lens, last=tok, done=_finished(rows, tok, n_gen), n_gen=n_gen)
    return state, dict(tokens=tok[None], logprobs=lp[None], raw=raw[None])


@functools.partial(jax.jit, static_argnames="spec", donate_argnames="state")
def _decode(params, rows, state, *, spec: _Spec):
    _TRACES["decode", spec] += 1
    k, B = spec.decode_chunk, state["last"].shape[0]
    out = dict(tokens=jnp.full((k, B), -1, jnp.int32), logprobs=jnp.zeros((k, B), jnp.float32),
               raw=jnp.zeros((k, B), jnp.float32))

    def cond(carry):
        i, st, _ = carry
        return (i < k) & ~jnp.all(st["done"])

    def body(carry):
        i, st, out = carry
        active = ~st["done"]
        logits, cache = qwen3.forward_cached(params, spec.cfg, st["last"][:, None], st["cache"], st["lengths"],
                                             active[:, None], compute_dtype=spec.compute_dtype)
        tok, lp, raw = _sample_next(logits[:, 0], rows, st["n_gen"])
        n_gen = st["n_gen"] + active
        st = dict(cache=cache, lengths=st["lengths"] + active, last=jnp.where(active, tok, st["last"]),
                  done=st["done"] | (active & _finished(rows, tok, n_gen)), n_gen=n_gen)
        out = dict(tokens=out["tokens"].at[i].set(jnp.where(active, tok, -1)),
                   logprobs=out["logprobs"].at[i].set(lp), raw=out["raw"].at[i].set(raw))
        return i + 1, st, out

    _, state, out = jax.lax.while_loop(cond, body, (jnp.int32(0), state, out))
    return state, out


# --------------------------------------------------------------------------- host side


@dataclasses.dataclass
class _Request:
    prompt: list[int]
    params: SamplingParams
    max_new: int  # max_new_tokens clipped to the cache
    seed: int
    future: concurrent.futures.Future


class _Row:
    """Host-side progress of one request within a batch."""

    def __init__(self, req: _Request, tokenizer):
        self.req, self.tokenizer = req, tokenizer
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.raw: list[float] = []
        self.finish: str | None = None
        self.stop_reason: str | int | None = None
        self.stops = set(req.params.stop_token_ids)
        self.stop_strings = tuple(req.params.stop_strings)
        # A string of n characters spans at most 4n byte-level tokens (a token holds >= 1 byte).
        self.window = 4 * max(map(len, self.stop_strings), default=0) + 4

    def add(self, tok: int, lp: float, raw: float) -> None:
        self.ids.append(tok), self.logprobs.append(lp), self.raw.append(raw)
        if tok in self.stops:
            self.finish, self.stop_reason = "stop", tok
        elif self.stop_strings and (hit := self._stop_string()) is not None:
            self.finish, self.stop_reason = "stop", hit
        elif len(self.ids) >= self.req.max_new:
            self.finish = "length"

    def _stop_string(self) -> str | None:
        # Checked after every token, so the first token whose text completes a stop string is
        # the one that ends generation; the window only has to cover the string.
        tail = self.tokenizer.decode(self.ids[-self.window:])
        return next((s for s in self.stop_strings if s in tail), None)

    def result(self, policy_version: int) -> JaxGenerateResult:
        return JaxGenerateResult(self.ids, self.logprobs, self.finish, policy_version, self.stop_reason, self.raw)


class JaxEngine:
    """Engine protocol implementation on the JAX Qwen3; see the module docstring.

    params: the `qwen3.init_params` pytree (placed by `param_shardings` when `mesh` is given;
    its dtype is kept, e.g. bf16 weights with compute_dtype=bf16 on GPU). tokenizer: needed only
    for stop strings. decode_chunk: decode steps per dispatch (one host sync each).
    """

    kind = "builtin"

    def __init__(self, params, cfg: ModelConfig, *, tokenizer=None, max_seq_len: int = 4096,
                 max_batch: int = 16, decode_chunk: int = 16, prefill_chunk: int = 512,
                 compute_dtype=jnp.float32, cache_dtype=None, mesh: jax.sharding.Mesh | None = None,
                 batch_wait_s: float = 0.0, policy_version: int = 0, seed: int = 0):
        if max_seq_len < 2 or max_batch < 1 or decode_chunk < 1:
            raise ValueError("JaxEngine: max_seq_len must be >= 2, max_batch and decode_chunk >= 1")
        if prefill_chunk < 1 or prefill_chunk & (prefill_chunk - 1):
            raise ValueError(f"JaxEngine: prefill_chunk must be a power of two, got {prefill_chunk}")
        compute_dtype = jnp.dtype(compute_dtype)
        self._spec = _Spec(cfg, max_seq_len, prefill_chunk, decode_chunk, compute_dtype,
                           jnp.dtype(cache_dtype or compute_dtype))
        self.cfg, self.tokenizer, self.mesh = cfg, tokenizer, mesh
        self.max_seq_len, self.max_batch, self.batch_wait_s = max_seq_len, max_batch, batch_wait_s
        self._shapes = jax.eval_shape(lambda: qwen3.init_params(cfg, jax.random.key(0)))
        self._shardings = (qwen3.param_shardings(cfg, mesh) if mesh is not None else
                           jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), self._shapes))
        self._params = self._own(params)
        self.policy_version = policy_version
        self.batches_run = 0
        self._lock = threading.Lock()  # guards (_params, policy_version) and the seed RNG
        self._rng = np.random.default_rng(seed)
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._worker = threading.Thread(target=self._serve, name="JaxEngine", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_checkpoint(cls, orbax_dir: str, *, dtype=None, mesh=None, **kwargs) -> "JaxEngine":
        """Weights from `checkpoints_tools` Orbax format (`restore_params`), cast to `dtype`."""
        from checkpoints_tools.orbax_io import restore_params

        params, cfg = restore_params(orbax_dir, mesh=mesh, dtype=dtype)
        return cls(params, cfg, mesh=mesh, **kwargs)

    @classmethod
    def from_hf_dir(cls, hf_dir: str, *, dtype="float32", **kwargs) -> "JaxEngine":
        """Weights straight from a HF Qwen3 directory (config.json + safetensors), converted in
        memory with `checkpoints_tools.hf_to_orbax`'s validated reader; nothing is written."""
        from checkpoints_tools.hf_to_orbax import load_hf_params

        params, cfg = load_hf_params(hf_dir, np.dtype(jnp.dtype(dtype)))
        return cls(params, cfg, **kwargs)

    # ------------------------------------------------------------------ public API

    def generate(self, input_ids: list[list[int]],
                 params: SamplingParams | list[SamplingParams]) -> list[JaxGenerateResult]:
        """Blocking; thread-safe. Prompts of one call may be split over batches, and share them
        with other callers' prompts. Every request is validated before any is queued."""
        per = [params] * len(input_ids) if isinstance(params, SamplingParams) else list(params)
        if len(per) != len(input_ids):
            raise ValueError(f"{len(per)} SamplingParams for {len(input_ids)} prompts")
        for ids, p in zip(input_ids, per):
            self._validate(ids, p)
        futures = [self.submit(ids, p) for ids, p in zip(input_ids, per)]
        return [f.result() for f in futures]

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> concurrent.futures.Future:
        """Queues one request; the future resolves to its JaxGenerateResult (or the batch's
        exception). For servers: submit each incoming request and await
        `asyncio.wrap_future(future)`; the worker batches whatever is queued."""
        if self._closed:
            raise RuntimeError("JaxEngine is closed")
        prompt = [int(t) for t in prompt_ids]
        self._validate(prompt, params)
        with self._lock:
            seed = params.seed if params.seed is not None else int(self._rng.integers(2**31))
            version = self.policy_version
        future: concurrent.futures.Future = concurrent.futures.Future()
        max_new = min(params.max_new_tokens, self.max_seq_len - len(prompt))
        if max_new == 0:
            future.set_result(JaxGenerateResult([], [], "length", version, None, []))
        else:
            self._queue.put(_Request(prompt, params, max_new, seed & 0xFFFFFFFF, future))
        return future

    def update_weights(self, params, version: int | None = None) -> int:
        """Swaps in new weights (same tree and shapes; cast to the engine's dtypes, placed on its
        shardings, so nothing recompiles) and sets policy_version to `version` (default: +1).
        The engine keeps its own copy: the caller may donate or delete its arrays afterwards.
        A batch already running finishes on the old weights and reports the old version."""
        new = self._own(params, self._params)
        with self._lock:
            self._params = new
            self.policy_version = self.policy_version + 1 if version is None else int(version)
            return self.policy_version

    @property
    def compile_counts(self) -> dict[str, int]:
        """Times prefill / decode were traced (= compiled) for this engine's static config;
        engines with the same config share compiled code and these counts."""
        return {name: _TRACES[name, self._spec] for name in ("prefill", "decode")}

    def close(self) -> None:
        """Stops the worker after the queued requests are done."""
        self._closed = True
        self._queue.put(None)
        self._worker.join()

    # ------------------------------------------------------------------ internals

    def _own(self, params, like=None):
        """Engine-owned copy of `params` on the engine's shardings, in the dtypes of `like`
        (default: params' own dtypes)."""
        want = jax.tree.structure(self._shapes)
        if jax.tree.structure(params) != want:
            raise ValueError(f"params tree {jax.tree.structure(params)} does not match the model's {want}")

        def place(path, x, sharding, ref, like):
            if tuple(x.shape) != ref.shape:
                raise ValueError(f"parameter {jax.tree_util.keystr(path)} has shape {tuple(x.shape)}, "
                                 f"the model {ref.shape}")
            if x.dtype != like.dtype:
                return jax.device_put(x, sharding).astype(like.dtype)  # astype makes the copy
            return jax.device_put(x, sharding, may_alias=False)

        return jax.tree_util.tree_map_with_path(place, params, self._shardings, self._shapes,
                                                params if like is None else like)

    def _validate(self, prompt, p: SamplingParams) -> None:
        if len(prompt) == 0:
            raise ValueError("empty prompt: at least one input token is needed")
        if len(prompt) >= self.max_seq_len:
            raise ContextLengthError(
                f"prompt of {len(prompt)} tokens is longer than the model's context length "
                f"(max_seq_len={self.max_seq_len}: prompt + generated tokens must fit the KV cache)")
        if min(prompt) < 0 or max(prompt) >= self.cfg.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.cfg.vocab_size})")
        if p.temperature < 0 or not 0 < p.top_p <= 1 or p.top_k < 0 or p.max_new_tokens < 0:
            raise ValueError(f"bad sampling params {p}: need temperature >= 0, 0 < top_p <= 1, top_k >= 0, "
                             "max_new_tokens >= 0")
        if p.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer: build the engine with tokenizer=...")

    def _serve(self) -> None:
        while (first := self._queue.get()) is not None:
            batch = [first]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:  # close(): finish this batch, then stop
                    self._queue.put(None)
                    break
                batch.append(item)
            try:
                results = self._run_batch(batch)
            except BaseException as e:  # the callers see it; the worker keeps serving
                for r in batch:
                    r.future.set_exception(e)
            else:
                for r, res in zip(batch, results):
                    r.future.set_result(res)

    def _run_batch(self, batch: list[_Request]) -> list[JaxGenerateResult]:
        with self._lock:
            params, version = self._params, self.policy_version
        B = min(_bucket(len(batch)), self.max_batch)
        P = _bucket(max(len(r.prompt) for r in batch), MIN_PROMPT_BUCKET)
        ns = _bucket(max((len(r.params.stop_token_ids) for r in batch), default=0), MIN_STOP_ID_SLOTS)
        tokens = np.zeros((B, P), np.int32)
        rows = dict(temperature=np.zeros(B, np.float32), top_k=np.zeros(B, np.int32),
                    top_p=np.ones(B, np.float32), seed=np.zeros(B, np.uint32),
                    max_new=np.ones(B, np.int32), stop_ids=np.full((B, ns), -1, np.int32))
        prompt_lens = np.ones(B, np.int32)  # padding rows: one token, done after one step
        for i, r in enumerate(batch):
            p = r.params
            tokens[i, :len(r.prompt)] = r.prompt
            prompt_lens[i] = len(r.prompt)
            rows["temperature"][i], rows["top_k"][i], rows["top_p"][i] = p.temperature, p.top_k, p.top_p
            rows["seed"][i], rows["max_new"][i] = r.seed, r.max_new
            rows["stop_ids"][i, :len(p.stop_token_ids)] = p.stop_token_ids
        hosts = [_Row(r, self.tokenizer) for r in batch]

        mesh_ctx = jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()
        with mesh_ctx:
            rows = jax.device_put(rows)
            state, out = _prefill(params, rows, tokens, prompt_lens, spec=self._spec)
            while True:
                # Dispatch the next chunk before reading this one, so the device never waits on
                # the host; at most one chunk is wasted once every row has finished.
                nxt = None
                if any(h.finish is None for h in hosts):
                    state, nxt = _decode(params, rows, state, spec=self._spec)
                if not self._consume(hosts, out):
                    break
                ended = [i for i, h in enumerate(hosts) if h.finish is not None]
                state["done"] = state["done"].at[np.array(ended, np.int32)].set(True) if ended else state["done"]
                out = nxt
        self.batches_run += 1
        return [h.result(version) for h in hosts]

    @staticmethod
    def _consume(hosts: list[_Row], out) -> bool:
        """Appends a chunk's tokens to the unfinished rows; True while any row is unfinished."""
        out = jax.device_get(out)
        toks, lps, raws = out["tokens"], out["logprobs"], out["raw"]
        for i, h in enumerate(hosts):
            for t in range(toks.shape[0]):
                if h.finish is not None or toks[t, i] < 0:
                    break
                h.add(int(toks[t, i]), float(lps[t, i]), float(raws[t, i]))
        return any(h.finish is None for h in hosts)


def from_config(config) -> JaxEngine:
    """The engine for `config.engine.kind == "builtin"`: weights from `engine.checkpoint`
    (an `hf_to_orbax` output, or an SFT run's `params/`), computing in `model.compute_dtype`."""
    from tau2jax.config import ConfigError
    from tau2jax.data.tokenizer import load_tokenizer

    e = config.engine
    if not e.checkpoint:
        raise ConfigError("config.engine.checkpoint: the builtin engine needs converted weights "
                          "(python -m checkpoints_tools.hf_to_orbax, or an SFT run's params/ dir)")
    compute_dtype = jnp.dtype(config.model.compute_dtype)
    return JaxEngine.from_checkpoint(
        e.checkpoint, dtype=compute_dtype, compute_dtype=compute_dtype, max_seq_len=e.max_seq_len,
        max_batch=e.max_batch, tokenizer=load_tokenizer(config.tokenizer.path or config.model.hf_dir),
        seed=config.seed)
