"""The built-in JAX inference engine: batched prefill + KV-cache decoding on `qwen3.forward_cached`.

Serving model
    Every `generate` / `submit` call puts its prompts on one queue, as one group; a worker thread
    takes up to `max_batch` queued requests at a time (whatever is waiting, after an optional
    `batch_wait_s`; a group is not split unless it overflows the batch) and runs them as one
    static batch until every row has finished. So concurrent callers (episode threads, HTTP
    handlers) are batched together without coordinating, and the engine is safe to call from any
    thread. Requests queued while a batch runs go into the next one. `close()` lets the requests
    queued before it finish; later ones fail with a RuntimeError.

Continuous batching (`scheduler="continuous"`; the default is "static", above)
    One running batch of `max_batch` slots on one cache length S. Between decode chunks the
    worker reads the chunk the device just ran (the next one already dispatched), retires the rows
    that finished (their KV to the prefix cache, their futures resolved: the slot is free) and
    admits queued requests into the free slots: they are prefilled as a sub-batch (bucketed like a
    static batch, prefix blocks copied in, at the running S) and scattered into their slots by
    `_insert`; the next chunk decodes them with the rest. So a request waits for at most one chunk
    and a free slot, not for the longest row. A request needing more than S grows the running cache
    a bucket at a time (`_grow`, a zero pad); the cache goes back to the need of the next requests
    only when the batch drains. Free slots are done rows (masked, nothing written); a retired
    row's slot takes the last occupied row (`_compact`, one slot copied), so the occupied slots
    lead and a chunk decodes only their batch bucket (`_decode_lead`: a step costs what its rows
    cost, the vocabulary head and sampling most). When a row reaches max_new_tokens within the
    chunks in flight, the worker reads them before dispatching the next, so its slot is refilled
    a chunk sooner. An admitted request shares a running row's prompt KV where that beats the
    prefix cache (rows that start together prefill a shared system prompt once). Every row keeps
    the weights it began with: after a swap no request is admitted until the running batch has
    drained, so its rows finish on the old params and report the old version, and new requests
    start on the new ones. The device's stop-id table has MIN_STOP_ID_SLOTS columns (a request
    with more has the others checked on the host: no new shape). Shapes: decode of each leading
    bucket, slot moves and prefix-block copies at (max_batch, S), prefill at (sub-batch bucket,
    S), inserts (sub-batch bucket, S), the growths S -> next S; `warmup()` compiles them all.
    `batches_run` counts admissions.
    `batches_itself` is True: the server's `Batcher` hands each request straight to `submit`.

Shapes are a fixed set, so nothing compiles in steady state: the batch is padded to a bucket (1, 2,
4, ..., max_batch) and the KV cache to the batch's need, the next power of two >= max(prompt +
max_new) over its rows (>= 256, at most `max_seq_len` rounded up to a prefix block). Every jitted
function's shapes depend on that (batch, cache) pair only: prefill takes the prompts padded to the
cache length and runs only as many slices as the longest new part needs (a `fori_loop` with a
traced trip count), decode and the prefix-block copies have no other shape (but for a request with
more than MIN_STOP_ID_SLOTS stop ids, which widens the stop table). `warmup()` compiles
every pair up front (or those up to a given cache length / batch sizes); `compile_counts` says how
many times prefill and decode were traced. Prefill runs the prompt through the cache in slices
small enough that one slice's attention scores (batch x heads x slice x cache length) stay under
`PREFILL_SCORES` elements (at most `prefill_chunk` tokens and a quarter of the cache length), the
last partial slice in slices of PREFILL_TAIL_SLICE (64) tokens, so a prefix hit with a few new
tokens computes 64 of them, and computes logits only for each row's last prompt token. Decoding runs
`decode_chunk` steps per dispatch in a `lax.while_loop` (which exits as soon as every row is
done); stop token ids and max_new_tokens are checked on device, stop strings on the host, and
the host reads chunk i while the device runs chunk i+1.

Prefix cache (`prefix_cache_tokens` > 0)
    The KV of every finished request (its prompt and output) is kept on device, keyed by those
    token ids, in an LRU bounded by the cache slots it holds, as blocks of 256 slots (fewer when
    max_seq_len is smaller; one fixed-shape copy each). A new request takes the entry that
    shares the longest prefix with its prompt, copies the blocks holding that prefix into its row
    and prefills only the rest (at least its last token). A tau2 episode's next turn extends the
    previous turn's prompt and output, so it prefills only the new user / tool messages. The cache is emptied on every
    `update_weights`: KV from old weights never serves a newer policy version. `stats()` counts
    hits and prefill tokens saved.

Sampling and log-probs (see `tau2jax.inference.sampling`): `logprobs` follow the behaviour
convention of `GenerateResult`, log_softmax(logits / T) at the token before top-k / top-p
(T = 0: log_softmax(logits)); `sampled_logprobs` are under the filtered distribution actually
drawn from. The noise of a request's token at absolute position i (prompt length + index) is keyed
on fold_in(key(seed), i): the same (seed, prompt) samples the same tokens in any batch, while a
later turn of the same episode (a longer prompt) draws fresh noise even with the same seed.
Without a seed the engine draws one from its own RNG.

Stops: generation ends at the first stop token (kept in `output_ids`), or at the first token
whose detokenized text completes a stop string (that token is kept; needs `tokenizer`), with
finish_reason "stop" and `stop_reason` the id / string; else after max_new_tokens (clipped to
the context: prompt + new <= max_seq_len) with "length". Every result carries the
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
from tau2jax.parallel.host_gather import host_params
from tau2jax.parallel.sharding import constrain
from tau2jax.inference import sampling
from tau2jax.inference.engine import ContextLengthError, GenerateResult, SamplingParams, settle
from tau2jax.weights.hf_read import load_hf_params
from tau2jax.weights.orbax_params import restore_params

MIN_CACHE_BUCKET = 256
SCHEDULERS = ("static", "continuous")
MIN_STOP_ID_SLOTS = 8  # stop-id table width; more stop ids round up to a power of two (a new shape)
# Attention-score elements of one prefill slice (B x heads x slice x cache): 2 GiB in fp32. Qwen3-4B
# (32 heads), batch 16, cache 32K -> 32-token slices; short caches keep `prefill_chunk`.
PREFILL_SCORES = 2 ** 29
# A prefill's last, partial slice is cut in slices of this many tokens (or the slice length when
# smaller): the new part of a prefix hit is often a few dozen tokens.
PREFILL_TAIL_SLICE = 64


class _Spec(NamedTuple):
    """Everything static about the compiled functions; engines with equal specs share them."""
    cfg: ModelConfig
    prefill_chunk: int
    decode_chunk: int
    compute_dtype: jnp.dtype
    cache_dtype: jnp.dtype


# (function name, spec) -> times traced. Tracing happens exactly when jit misses its cache.
_TRACES: collections.Counter = collections.Counter()


def _bucket(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << (n - 1).bit_length())


def _slice_len(spec: _Spec, B: int, S: int) -> int:
    """Prefill slice for batch B and cache length S: a power of two, at most prefill_chunk and S / 4,
    scores under PREFILL_SCORES (a quarter of the cache: short caches get short slices)."""
    fits = max(1, PREFILL_SCORES // (B * spec.cfg.num_heads * S))
    return min(spec.prefill_chunk, max(1, _bucket(S) // 4), 1 << (fits.bit_length() - 1))


def _prefill_width(spec: _Spec, B: int, S: int) -> int:
    """Width of prefill's token array for batch B and cache S: S rounded up to whole slices."""
    c = _slice_len(spec, B, S)
    return -(-S // c) * c


# --------------------------------------------------------------------------- jitted device code
# rows:  per-request constants [B]: temperature, top_k, top_p, seed, max_new, prompt_len,
#        stop_ids [B, NS]
# state: cache, lengths (tokens in cache), last (sampled, not yet fed), done, n_gen [B]
# out:   tokens [k, B] (-1 where the row emitted nothing), logprobs, sampled [k, B]


def _sample_next(logits, rows, n_gen):
    # Keyed on the token's absolute position, not on n_gen alone: see the module docstring.
    pos = rows["prompt_len"] + n_gen
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(rows["seed"], pos)
    return sampling.sample(keys, logits, rows["temperature"], rows["top_k"], rows["top_p"])


def _finished(rows, tok, n_gen):
    return jnp.any(tok[:, None] == rows["stop_ids"], axis=1) | (n_gen >= rows["max_new"])


@functools.partial(jax.jit, static_argnames=("spec", "batch", "length"))
def _empty_cache(*, spec: _Spec, batch: int, length: int):
    cache = qwen3.init_cache(spec.cfg, batch, length, spec.cache_dtype)
    return {n: constrain(a, ax) for (n, a), ax in zip(cache.items(), qwen3.cache_axes().values())}


@functools.partial(jax.jit, static_argnames="size", donate_argnames="cache")
def _put_block(cache, block, row, start, *, size: int):
    """Writes a prefix block {"k","v": [L, size, K, Dh]} into slots [start, start + size) of cache row `row`."""
    return {n: jax.lax.dynamic_update_slice(cache[n], block[n][:, None], (0, row, start, 0, 0)) for n in cache}


@functools.partial(jax.jit, static_argnames="size")
def _take_block(cache, row, start, *, size: int):
    """Slots [start, start + size) of cache row `row`, as a prefix block {"k","v": [L, size, K, Dh]}."""
    L, _, _, K, Dh = cache["k"].shape
    return {n: jax.lax.dynamic_slice(cache[n], (0, row, start, 0, 0), (L, 1, size, K, Dh))[:, 0] for n in cache}


@functools.partial(jax.jit, static_argnames="spec", donate_argnames="cache")
def _prefill(params, rows, cache, tokens, start, *, spec: _Spec):
    """Feeds each row's prompt from position `start` [B] on (slots < start already hold its
    prefix); tokens [B, W] = prompt[start:], right-padded to W (a multiple of the slice length
    >= the cache length, so the shape depends on (B, cache) only). Runs only as many slices as the
    longest row needs. Samples the first new token."""
    _TRACES["prefill", spec] += 1
    cfg = spec.cfg
    B, W = tokens.shape
    c = _slice_len(spec, B, cache["k"].shape[2])
    tail = min(c, PREFILL_TAIL_SLICE)
    n_new = rows["prompt_len"] - start

    def run_slice(off, width, carry):
        cache, last_hidden = carry
        pos = off + jnp.arange(width)
        hidden, cache = qwen3.forward_cached(
            params, cfg, jax.lax.dynamic_slice_in_dim(tokens, off, width, axis=1), cache,
            start + jnp.minimum(off, n_new), pos[None] < n_new[:, None],
            compute_dtype=spec.compute_dtype, return_hidden=True)
        idx = n_new - 1 - off  # each row's last prompt token, if in this slice
        here = hidden[jnp.arange(B), jnp.clip(idx, 0, width - 1)]
        last_hidden = jnp.where(((idx >= 0) & (idx < width))[:, None], here, last_hidden)
        return cache, last_hidden

    # Whole slices of c, then the rest in slices of `tail`: a prefix hit with a few new tokens
    # costs a tail slice's attention over the cache, not a full slice's (W - n_full * c >= c when
    # a tail is left, so the tail slices stay inside the token array).
    need = jnp.max(n_new)
    n_full = need // c
    n_tail = (need - n_full * c + tail - 1) // tail
    carry = (cache, jnp.zeros((B, cfg.hidden_size), spec.compute_dtype))
    carry = jax.lax.fori_loop(0, n_full, lambda i, cr: run_slice(i * c, c, cr), carry)
    carry = jax.lax.fori_loop(0, n_tail, lambda j, cr: run_slice(n_full * c + j * tail, tail, cr), carry)
    cache, last_hidden = carry
    logits = qwen3.logits_from_hidden(params, cfg, last_hidden)
    n_gen = jnp.zeros(B, jnp.int32)
    tok, lp, slp = _sample_next(logits, rows, n_gen)
    n_gen = n_gen + 1
    state = dict(cache=cache, lengths=rows["prompt_len"], last=tok, done=_finished(rows, tok, n_gen), n_gen=n_gen)
    return state, dict(tokens=tok[None], logprobs=lp[None], sampled=slp[None])


@functools.partial(jax.jit, static_argnames="spec", donate_argnames="state")
def _decode(params, rows, state, ended, *, spec: _Spec):
    """Up to decode_chunk steps; `ended` [B] marks rows the host finished (stop strings)."""
    _TRACES["decode", spec] += 1
    return _decode_steps(params, rows, state, ended, spec)


def _decode_steps(params, rows, state, ended, spec: _Spec):
    k, B = spec.decode_chunk, state["last"].shape[0]
    state = {**state, "done": state["done"] | ended}
    out = dict(tokens=jnp.full((k, B), -1, jnp.int32), logprobs=jnp.zeros((k, B), jnp.float32),
               sampled=jnp.zeros((k, B), jnp.float32))

    def cond(carry):
        i, st, _ = carry
        return (i < k) & ~jnp.all(st["done"])

    def body(carry):
        i, st, out = carry
        active = ~st["done"]
        logits, cache = qwen3.forward_cached(params, spec.cfg, st["last"][:, None], st["cache"], st["lengths"],
                                             active[:, None], compute_dtype=spec.compute_dtype)
        tok, lp, slp = _sample_next(logits[:, 0], rows, st["n_gen"])
        n_gen = st["n_gen"] + active
        st = dict(cache=cache, lengths=st["lengths"] + active, last=jnp.where(active, tok, st["last"]),
                  done=st["done"] | (active & _finished(rows, tok, n_gen)), n_gen=n_gen)
        out = dict(tokens=out["tokens"].at[i].set(jnp.where(active, tok, -1)),
                   logprobs=out["logprobs"].at[i].set(lp), sampled=out["sampled"].at[i].set(slp))
        return i + 1, st, out

    _, state, out = jax.lax.while_loop(cond, body, (jnp.int32(0), state, out))
    return state, out


# Continuous batching: a running batch of B slots (state and rows as above, on device), idle
# slots done; a sub-batch prefilled by `_device_batch` is scattered into free slots by `_insert`;
# the cache grows one bucket at a time by `_grow`.


@functools.partial(jax.jit, static_argnames=("spec", "batch", "length", "ns"))
def _idle_state(*, spec: _Spec, batch: int, length: int, ns: int):
    """A running batch with every slot free (done): (state, rows) as prefill makes them."""
    _TRACES["idle", spec] += 1
    state = dict(cache=_empty_cache(spec=spec, batch=batch, length=length), lengths=jnp.ones(batch, jnp.int32),
                 last=jnp.zeros(batch, jnp.int32), done=jnp.ones(batch, bool), n_gen=jnp.zeros(batch, jnp.int32))
    rows = dict(temperature=jnp.zeros(batch, jnp.float32), top_k=jnp.zeros(batch, jnp.int32),
                top_p=jnp.ones(batch, jnp.float32), seed=jnp.zeros(batch, jnp.uint32),
                max_new=jnp.ones(batch, jnp.int32), prompt_len=jnp.ones(batch, jnp.int32),
                stop_ids=jnp.full((batch, ns), -1, jnp.int32))
    return state, rows


@functools.partial(jax.jit, static_argnames="spec", donate_argnames=("state", "rows"))
def _insert(state, rows, sub_state, sub_rows, slots, *, spec: _Spec):
    """Scatters a prefilled sub-batch (sub_state, sub_rows: b rows, the running cache length)
    into the running batch's slots `slots` [b] (= B for a padding row: dropped)."""
    _TRACES["insert", spec] += 1

    def put(a, b, axis=0):
        idx = (slice(None),) * axis + (slots,)
        return a.at[idx].set(b.astype(a.dtype), mode="drop")

    cache = {n: put(state["cache"][n], sub_state["cache"][n], axis=1) for n in state["cache"]}
    state = {**{k: put(state[k], sub_state[k]) for k in state if k != "cache"}, "cache": cache}
    return state, {k: put(rows[k], sub_rows[k]) for k in rows}


def _lead(tree: dict, b: int) -> dict:
    """The first b slots of a running batch's state or rows (the cache's batch axis is 1)."""
    return {n: {m: c[:, :b] for m, c in a.items()} if n == "cache" else a[:b] for n, a in tree.items()}


@functools.partial(jax.jit, static_argnames=("spec", "b"), donate_argnames="state")
def _decode_lead(params, rows, state, ended, *, spec: _Spec, b: int):
    """`_decode` on the first b slots of the running batch (the occupied ones: see `_compact`),
    written back in place; ended [b]. A step's cost is its rows' (the vocabulary head and
    sampling), so a half-empty batch decodes at half the cost."""
    _TRACES["decode_lead", spec] += 1
    sub, out = _decode_steps(params, _lead(rows, b), _lead(state, b), ended, spec)
    put = lambda a, x, axis=0: jax.lax.dynamic_update_slice_in_dim(a, x, 0, axis)
    cache = {n: put(state["cache"][n], sub["cache"][n], 1) for n in state["cache"]}
    return {**{k: put(state[k], sub[k]) for k in state if k != "cache"}, "cache": cache}, out


@functools.partial(jax.jit, static_argnames="spec", donate_argnames=("state", "rows"))
def _move(state, rows, src, dst, *, spec: _Spec):
    """Copies slot src of the running batch (its KV, state and constants) to slot dst."""
    _TRACES["move", spec] += 1

    def mv(a, axis=0):
        return jax.lax.dynamic_update_index_in_dim(a, jax.lax.dynamic_index_in_dim(a, src, axis), dst, axis)

    cache = {n: mv(a, 1) for n, a in state["cache"].items()}
    return {**{k: mv(state[k]) for k in state if k != "cache"}, "cache": cache}, {k: mv(v) for k, v in rows.items()}


@functools.partial(jax.jit, static_argnames=("spec", "length"))  # a new shape: nothing to donate
def _grow(state, *, spec: _Spec, length: int):
    """The running cache padded to `length` slots (the new slots are garbage-free zeros)."""
    _TRACES["grow", spec] += 1
    S = state["cache"]["k"].shape[2]
    cache = {n: constrain(jnp.pad(a, ((0, 0), (0, 0), (0, length - S), (0, 0), (0, 0))), ax)
             for (n, a), ax in zip(state["cache"].items(), qwen3.cache_axes().values())}
    return {**state, "cache": cache}


# --------------------------------------------------------------------------- prefix cache


@dataclasses.dataclass
class _Entry:
    ids: np.ndarray  # int32 token ids whose KV `kv` holds (slots >= len(ids) are garbage)
    kv: list  # consecutive blocks {"k","v": [L, block, K, Dh]} on device (slots 0, block, 2 block, ...)
    slots: int


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if diff.size else m


class PrefixCache:
    """LRU of finished requests' KV keyed by token ids, holding at most `capacity` cache slots.
    Not thread-safe: the engine guards it with its lock."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: collections.OrderedDict[bytes, _Entry] = collections.OrderedDict()
        self.slots = 0

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, prompt: np.ndarray) -> tuple[_Entry | None, int]:
        """(the entry sharing the longest prefix with `prompt`, that length), leaving at least
        the prompt's last token to prefill; (None, 0) if nothing is shared."""
        best, n = None, 0
        for e in self._entries.values():
            m = min(_common_prefix(prompt, e.ids), len(prompt) - 1)
            if m > n:
                best, n = e, m
        if best is not None:
            self._entries.move_to_end(best.ids.tobytes())
        return best, n

    def covers(self, ids: np.ndarray) -> bool:
        """Whether an entry already holds `ids` (as a prefix of its own): storing it adds nothing."""
        return any(len(e.ids) >= len(ids) and _common_prefix(ids, e.ids) == len(ids)
                   for e in self._entries.values())

    def add(self, ids: np.ndarray, kv: dict, slots: int) -> None:
        """Stores an entry; drops those it extends (it serves every prompt they served, as well),
        then the least recently used until the slots fit."""
        if slots > self.capacity:
            return
        for key in [k for k, e in self._entries.items() if _common_prefix(ids, e.ids) == len(e.ids)]:
            self.slots -= self._entries.pop(key).slots
        self._entries[ids.tobytes()] = _Entry(ids, kv, slots)
        self.slots += slots
        while self.slots > self.capacity:
            self.slots -= self._entries.popitem(last=False)[1].slots

    def clear(self) -> None:
        self._entries.clear()
        self.slots = 0


# --------------------------------------------------------------------------- host side


@dataclasses.dataclass
class _Request:
    prompt: list[int]
    params: SamplingParams
    max_new: int  # max_new_tokens clipped to the context
    seed: int
    future: concurrent.futures.Future


class _Row:
    """Host-side progress of one request within a batch."""

    def __init__(self, req: _Request, tokenizer):
        self.req, self.tokenizer = req, tokenizer
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.sampled: list[float] = []
        self.finish: str | None = None
        self.stop_reason: str | int | None = None
        self.stops = set(req.params.stop_token_ids)
        self.stop_strings = tuple(req.params.stop_strings)
        self.shared: list = []  # continuous: the prefix entry's blocks this row's cache shares
        # A string of n characters spans at most 4n byte-level tokens (a token holds >= 1 byte).
        self.window = 4 * max(map(len, self.stop_strings), default=0) + 4

    def add(self, tok: int, lp: float, slp: float) -> None:
        self.ids.append(tok), self.logprobs.append(lp), self.sampled.append(slp)
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

    def result(self, policy_version: int) -> GenerateResult:
        return GenerateResult(self.ids, self.logprobs, self.finish, policy_version, self.stop_reason, self.sampled)


def _pack(batch: list[_Request], prompts: list[np.ndarray], cached: list[int], B: int, P: int,
          ns: int | None = None):
    """Host arrays of a batch padded to B rows: tokens [B, P] (each prompt after its `cached`
    prefix), start [B] (= cached) and the per-row constants `rows` of the jitted functions. `ns`:
    the stop-id table's width (default: wide enough for every row's); a row with more stop ids
    keeps its first `ns` on device (the host still stops at the others)."""
    if ns is None:
        ns = _bucket(max((len(r.params.stop_token_ids) for r in batch), default=0), MIN_STOP_ID_SLOTS)
    tokens, start = np.zeros((B, P), np.int32), np.zeros(B, np.int32)
    rows = dict(temperature=np.zeros(B, np.float32), top_k=np.zeros(B, np.int32),
                top_p=np.ones(B, np.float32), seed=np.zeros(B, np.uint32), max_new=np.ones(B, np.int32),
                prompt_len=np.ones(B, np.int32),  # padding rows: one token, done after one step
                stop_ids=np.full((B, ns), -1, np.int32))
    for i, (r, prompt, n) in enumerate(zip(batch, prompts, cached)):
        p = r.params
        tokens[i, :len(prompt) - n], start[i] = prompt[n:], n
        rows["temperature"][i], rows["top_k"][i], rows["top_p"][i] = p.temperature, p.top_k, p.top_p
        rows["seed"][i], rows["max_new"][i], rows["prompt_len"][i] = r.seed, r.max_new, len(prompt)
        stops = tuple(p.stop_token_ids)[:ns]
        rows["stop_ids"][i, :len(stops)] = stops
    return tokens, start, rows


@dataclasses.dataclass
class _Running:
    """The continuous scheduler's running batch: the weights its rows started on, its device
    state and per-slot constants, its cache length."""
    params: object
    version: int
    state: dict
    rows: dict
    S: int


class JaxEngine:
    """Engine protocol implementation on the JAX Qwen3; see the module docstring.

    params: the `qwen3.init_params` pytree (placed by `param_shardings` when `mesh` is given;
    its dtype is kept, e.g. bf16 weights with compute_dtype=bf16 on GPU). tokenizer: needed only
    for stop strings. max_seq_len: the context (prompt + generated tokens), the largest KV cache
    bucket. decode_chunk: decode steps per dispatch (one host sync each). prefill_chunk: most
    prompt tokens per prefill slice. prefix_cache_tokens: cache slots the prefix cache may hold
    (0 = off; each slot costs 2 x layers x kv_heads x head_dim values of cache_dtype).
    """

    kind = "builtin"
    location = "this process"
    default_tis_cap = 0.0  # its log-probs are the learner's own numerics

    def __init__(self, params, cfg: ModelConfig, *, tokenizer=None, max_seq_len: int = 4096,
                 max_batch: int = 16, decode_chunk: int = 16, prefill_chunk: int = 512,
                 compute_dtype=jnp.float32, cache_dtype=None, mesh: jax.sharding.Mesh | None = None,
                 batch_wait_s: float = 0.0, prefix_cache_tokens: int = 0, policy_version: int = 0, seed: int = 0,
                 scheduler: str = "static"):
        if scheduler not in SCHEDULERS:
            raise ValueError(f"JaxEngine: scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        if max_seq_len < 2 or max_batch < 1 or decode_chunk < 1 or prefix_cache_tokens < 0:
            raise ValueError("JaxEngine: max_seq_len must be >= 2, max_batch and decode_chunk >= 1, "
                             "prefix_cache_tokens >= 0")
        if prefill_chunk < 1 or prefill_chunk & (prefill_chunk - 1):
            raise ValueError(f"JaxEngine: prefill_chunk must be a power of two, got {prefill_chunk}")
        compute_dtype = jnp.dtype(compute_dtype)
        self._spec = _Spec(cfg, prefill_chunk, decode_chunk, compute_dtype, jnp.dtype(cache_dtype or compute_dtype))
        self.cfg, self.tokenizer, self.mesh = cfg, tokenizer, mesh
        self.max_seq_len, self.max_batch, self.batch_wait_s = max_seq_len, max_batch, batch_wait_s
        self.scheduler = scheduler
        # Prefix-cache block (slots per device copy) and the largest cache: every cache length is
        # a multiple of the block, so a block never straddles a row's end.
        self._block = min(MIN_CACHE_BUCKET, _bucket(max_seq_len))
        self._max_cache = -(-max_seq_len // self._block) * self._block
        self._shapes = jax.eval_shape(lambda: qwen3.init_params(cfg, jax.random.key(0)))
        self._shardings = (qwen3.param_shardings(cfg, mesh) if mesh is not None else
                           jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), self._shapes))
        self._params = self._own(params)
        self.policy_version = policy_version
        self.batches_run = 0
        # Guards _params, policy_version, the prefix cache, the seed RNG, _closed and the counters.
        self._lock = threading.Lock()
        self._prefix = PrefixCache(prefix_cache_tokens)
        self._counts = collections.Counter()
        self._rng = np.random.default_rng(seed)
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._pending_n = 0  # continuous: requests taken off the queue, not yet in a slot
        serve = self._serve if scheduler == "static" else self._serve_continuous
        self._worker = threading.Thread(target=serve, name="JaxEngine", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_checkpoint(cls, orbax_dir: str, *, dtype=None, mesh=None, **kwargs) -> "JaxEngine":
        """Weights in our Orbax format (`tau2jax.weights.orbax_params` (`restore_params`, sharded on `mesh` if
        given), cast to `dtype`."""
        params, cfg = restore_params(orbax_dir, mesh=mesh, dtype=dtype)
        return cls(params, cfg, mesh=mesh, **kwargs)

    @classmethod
    def from_hf_dir(cls, hf_dir: str, *, dtype="float32", **kwargs) -> "JaxEngine":
        """Weights straight from a HF Qwen3 directory (config.json + safetensors), converted in
        memory with `tau2jax.weights.hf_read`'s validated reader; nothing is written."""
        params, cfg = load_hf_params(hf_dir, np.dtype(jnp.dtype(dtype)))
        return cls(params, cfg, **kwargs)

    # ------------------------------------------------------------------ public API

    def generate(self, input_ids: list[list[int]],
                 params: SamplingParams | list[SamplingParams]) -> list[GenerateResult]:
        """Blocking; thread-safe. Every request is validated before any is queued; the prompts of
        one call are queued together, so they share a batch as far as max_batch allows (and
        share it with other callers' prompts)."""
        per = [params] * len(input_ids) if isinstance(params, SamplingParams) else list(params)
        if len(per) != len(input_ids):
            raise ValueError(f"{len(per)} SamplingParams for {len(input_ids)} prompts")
        for ids, p in zip(input_ids, per):
            self._validate(ids, p)
        return [f.result() for f in self._enqueue(list(zip(input_ids, per)))]

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> concurrent.futures.Future:
        """Queues one request; the future resolves to its GenerateResult (or the batch's
        exception; a RuntimeError once the engine is closed). For servers: submit each incoming
        request and await `asyncio.wrap_future(future)`; the worker batches whatever is queued."""
        self._validate(prompt_ids, params)
        return self._enqueue([(prompt_ids, params)])[0]

    def update_weights(self, params, version: int | None = None) -> int:
        """Swaps in new weights (same tree and shapes; cast to the engine's dtypes, placed on its
        shardings, so nothing recompiles), empties the prefix cache and sets policy_version to
        `version` (default: +1) -> that version. The engine keeps its own copy: the caller may
        donate or delete its arrays afterwards. A batch already running finishes on the old
        weights and reports the old version. = `swap_weights(stage_weights(params), version)`."""
        self.swap_weights(self.stage_weights(params), version)
        return self.policy_version

    def load_weights(self, path: str, version: int) -> None:
        """The published HF checkpoint at `path` (`weight_sync.publish`), read and swapped in."""
        self.update_weights(load_hf_params(path)[0], version)

    def reload(self, version: int) -> None:
        """Its weights live in this process: nothing can take them away."""
        if version != self.policy_version:
            raise ValueError(f"the built-in engine serves version {self.policy_version}, not {version}: push it")

    @property
    def synced_version(self) -> int:
        return self.policy_version  # built from, or swapped to, the learner's params

    def stage_weights(self, params):
        """The engine's copy of `params`, cast and placed on the devices (no host round trip),
        dispatched asynchronously; the engine keeps serving its current weights meanwhile. Call
        on the thread that owns `params` before it donates them. Params sharded over several
        processes are gathered whole to this host first (collective: every process calls it)."""
        return self._own(params, self._params)

    def swap_weights(self, staged, version: int | None = None) -> float:
        """The only pause: waits (unlocked) until `staged` (from `stage_weights`) is on the devices,
        then points the engine at it under its lock, empties the prefix cache, sets policy_version;
        the old buffers are freed when the last batch on them ends (here at the latest: outside the
        lock, so freeing them is no pause). -> seconds the lock was held, the engine's pause."""
        jax.block_until_ready(staged)  # a batch never waits for the copy
        with self._lock:
            t = time.perf_counter()
            old, self._params = self._params, staged
            self._prefix.clear()
            self.policy_version = self.policy_version + 1 if version is None else int(version)
            pause = time.perf_counter() - t
        del old
        return pause

    def served_version(self) -> int:
        return self.policy_version

    def identity(self) -> dict:
        return {"policy_version": self.policy_version}

    @property
    def compile_counts(self) -> dict[str, int]:
        """Times prefill / decode were traced (= compiled) for this engine's static config;
        engines with the same config share compiled code and these counts."""
        continuous = ("idle", "insert", "grow", "decode_lead", "move")
        names = ("prefill", "decode") + (continuous if self.scheduler == "continuous" else ())
        return {name: _TRACES[name, self._spec] for name in names}

    @property
    def batches_itself(self) -> bool:
        """Whether requests should be submitted one by one as they come (`submit`), not gathered
        into batches first: the continuous scheduler admits each into the running batch."""
        return self.scheduler == "continuous"

    def pending(self) -> int:
        """Requests queued and not yet running (continuous: not yet in a slot)."""
        return self._queue.qsize() + self._pending_n

    def stats(self) -> dict[str, int]:
        """Counters since construction: requests, prompt_tokens, prefill_tokens (prompt tokens
        actually computed), prefix_hits, prefix_tokens_saved; and the prefix cache's current
        prefix_entries / prefix_slots."""
        with self._lock:
            return {**{k: self._counts[k] for k in ("requests", "prompt_tokens", "prefill_tokens", "prefix_hits",
                                                    "prefix_tokens_saved")},
                    "prefix_entries": len(self._prefix), "prefix_slots": self._prefix.slots}

    def close(self) -> None:
        """Stops the worker after the requests already queued are done; later ones fail."""
        with self._lock:
            if not self._closed:
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
        if any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in jax.tree.leaves(params)):
            params = host_params(params)  # a multi-process learner's shards: a whole copy on this host

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

    def _enqueue(self, requests: list[tuple[list[int], SamplingParams]]) -> list[concurrent.futures.Future]:
        """Queues validated requests as one group (the worker takes a group whole where it fits
        the batch) and returns their futures."""
        futures, group = [], []
        # Checked and queued under the lock that close() takes: nothing lands behind its stop
        # marker, where the worker would never see it.
        with self._lock:
            for ids, p in requests:
                prompt = [int(t) for t in ids]
                future: concurrent.futures.Future = concurrent.futures.Future()
                futures.append(future)
                max_new = min(p.max_new_tokens, self.max_seq_len - len(prompt))
                if self._closed:
                    future.set_exception(RuntimeError("JaxEngine is closed: the request was not run"))
                elif max_new == 0:
                    future.set_result(GenerateResult([], [], "length", self.policy_version, None, []))
                else:
                    seed = p.seed if p.seed is not None else int(self._rng.integers(2**31))
                    group.append(_Request(prompt, p, max_new, seed & 0xFFFFFFFF, future))
            if group:
                self._queue.put(group)
        return futures

    def _serve(self) -> None:
        pending: collections.deque[_Request] = collections.deque()  # queued, not yet in a batch
        while pending or (group := self._queue.get()) is not None:
            if not pending:
                pending.extend(group)
            deadline = time.monotonic() + self.batch_wait_s
            while len(pending) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    group = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if group is None:  # close(): finish what was queued before it, then stop
                    self._queue.put(None)
                    break
                pending.extend(group)
            batch = [pending.popleft() for _ in range(min(len(pending), self.max_batch))]
            try:
                results = self._run_batch(batch)
            except BaseException as e:  # the callers see it; the worker keeps serving
                for r in batch:
                    settle(r.future, error=e)
            else:
                for r, res in zip(batch, results):
                    settle(r.future, res)

    def _serve_continuous(self) -> None:
        """The continuous scheduler's worker; see the module docstring."""
        B = self.max_batch
        pending: collections.deque[_Request] = collections.deque()
        slots: list[_Row | None] = [None] * B  # the request in each slot of the running batch
        run: _Running | None = None
        outs: collections.deque = collections.deque()  # (out, the host row of each column), dispatched, unread
        closing = False
        mesh_ctx = jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()
        while True:
            # Take what is queued; wait for it only when nothing runs.
            while not closing:
                idle = run is None and not pending
                try:
                    group = self._queue.get() if idle else self._queue.get_nowait()
                except queue.Empty:
                    break
                if group is None:
                    closing = True
                else:
                    pending.extend(group)
            self._pending_n = len(pending)
            if run is None and not pending:
                if closing:
                    return
                continue
            with mesh_ctx:
                try:
                    if run is not None and outs and self._length_ends_unread(outs):
                        # A row reaches max_new_tokens in the chunks in flight: read them before
                        # the next dispatch, so that its slot is refilled a chunk sooner instead
                        # of riding along done (rows ending on a stop token are not foreseen).
                        while outs:
                            self._consume_cols(*outs.popleft())
                        self._free_finished(run, slots)
                        run = self._refill(run, pending, slots, outs)
                    if run is not None:
                        nxt = None
                        if any(h is not None and h.finish is None for h in slots):
                            # The occupied slots lead (`_compact`): decode their bucket only.
                            b = min(_bucket(sum(h is not None for h in slots)), B)
                            cols = slots[:b]
                            ended = np.array([h is None or h.finish is not None for h in cols])
                            if b == B:
                                run.state, out = _decode(run.params, run.rows, run.state, ended, spec=self._spec)
                            else:
                                run.state, out = _decode_lead(run.params, run.rows, run.state, ended,
                                                              spec=self._spec, b=b)
                            nxt = (out, cols)
                        while outs:  # the device runs `nxt` meanwhile
                            self._consume_cols(*outs.popleft())
                        if nxt is not None:
                            outs.append(nxt)
                        self._free_finished(run, slots)
                except BaseException as e:  # the running rows see it; the worker keeps serving
                    for i, h in enumerate(slots):
                        if h is not None:
                            settle(h.req.future, error=e)
                            slots[i] = None
                    run, outs = None, collections.deque()
                run = self._refill(run, pending, slots, outs)
            self._pending_n = len(pending)

    def _free_finished(self, run: "_Running", slots: list) -> None:
        """Retires the finished rows and moves the others down so that the occupied slots lead."""
        self._retire(run, slots)
        self._compact(run, slots)

    def _refill(self, run, pending: collections.deque, slots: list, outs: collections.deque):
        """Drops a drained running batch (the next one starts on the current weights, at its own
        length) and admits pending requests into the free slots. -> the running batch."""
        if run is not None and not outs and all(h is None for h in slots):
            run = None
        return self._admit(run, pending, slots, outs) if pending else run

    def _retire(self, run: "_Running", slots: list) -> None:
        """Frees the slots of finished rows: their KV to the prefix cache, their results out."""
        for i, h in enumerate(slots):
            if h is not None and h.finish is not None:
                slots[i] = None
                self._remember([h], run.state["cache"], run.version, [h.shared], rows=[i])
                settle(h.req.future, h.result(run.version))

    @staticmethod
    def _length_ends_unread(outs: collections.deque) -> bool:
        """Whether a row reaches its max_new_tokens within the chunks dispatched and not yet read."""
        ahead: collections.Counter = collections.Counter()
        for out, cols in outs:
            for h in cols:
                if h is not None:
                    ahead[h] += out["tokens"].shape[0]
        return any(h.finish is None and len(h.ids) + n >= h.req.max_new for h, n in ahead.items())

    def _compact(self, run: "_Running", slots: list) -> None:
        """Moves the last occupied slot into the first free one below it until the occupied
        slots lead: decode then runs on their bucket, and admissions fill the slots after them."""
        while True:
            occupied = [i for i, h in enumerate(slots) if h is not None]
            free = [i for i, h in enumerate(slots) if h is None]
            if not occupied or not free or free[0] > occupied[-1]:
                return
            src, dst = occupied[-1], free[0]
            run.state, run.rows = _move(run.state, run.rows, np.int32(src), np.int32(dst), spec=self._spec)
            slots[dst], slots[src] = slots[src], None

    def _running_match(self, run: "_Running", slots: list, prompt: np.ndarray, hit: tuple) -> tuple:
        """The prefix cache's `hit` (entry, n), or, where a running row's prompt shares more with
        `prompt`, that row's leading blocks as an entry (its prompt's KV is in the running cache
        from its prefill on; the batch runs the current weights): episodes that start together
        share their system prompt before any of them has finished."""
        n, best = hit[1], None
        for i, h in enumerate(slots):
            if h is not None:
                m = min(_common_prefix(prompt, np.asarray(h.req.prompt, np.int32)), len(prompt) - 1)
                if m > n:
                    n, best = m, i
        if best is None:
            return hit
        kv = [_take_block(run.state["cache"], best, k * self._block, size=self._block)
              for k in range(-(-n // self._block))]
        return _Entry(prompt[:n], kv, 0), n

    def _admit(self, run, pending: collections.deque, slots: list, outs: collections.deque):
        """Prefills as many pending requests as there are free slots (sub-batches of a power of two
        rows, prefix blocks included) and inserts them into the running batch (started here if none runs; grown to
        their cache need). None are admitted while the running batch is on older weights: it
        drains first. -> the running batch."""
        with self._lock:
            params, version = self._params, self.policy_version
            if run is not None and run.params is not params:  # swapped: drain the running batch first
                return run
            free = [i for i, h in enumerate(slots) if h is None]
            # A power of two at a time: a sub-batch is padded to one, and its rows cost the same
            # prefill computed or padding (3 requests: 2 + 1 rows, not 4).
            m = min(len(free), len(pending))
            take = [pending.popleft() for _ in range(1 << (m.bit_length() - 1) if m else 0)]
            prompts = [np.asarray(r.prompt, np.int32) for r in take]
            hits = [self._prefix.match(p) for p in prompts]
        if not take:
            return run
        try:
            if run is not None:
                hits = [self._running_match(run, slots, p, hit) for p, hit in zip(prompts, hits)]
            S = self._cache_len(max(len(r.prompt) + r.max_new for r in take))
            if run is None:
                state, rows = _idle_state(spec=self._spec, batch=self.max_batch, length=S, ns=MIN_STOP_ID_SLOTS)
                run = _Running(params, version, state, rows, S)
            lens = self._cache_lens(self.max_seq_len)
            while run.S < S:  # one bucket at a time: the shapes warmup() made
                run.S = next(n for n in lens if n > run.S)
                run.state = _grow(run.state, spec=self._spec, length=run.S)
            b = min(_bucket(len(take)), self.max_batch)
            tokens, start, rows = _pack(take, prompts, [n for _, n in hits], b,
                                        _prefill_width(self._spec, b, run.S), ns=MIN_STOP_ID_SLOTS)
            puts = [(i, e.kv[:-(-n // self._block)]) for i, (e, n) in enumerate(hits) if e is not None]
            rows = jax.device_put(rows)
            sub_state, out = self._device_batch(params, rows, tokens, start, puts, b, run.S)
            dest = np.full(b, self.max_batch, np.int32)
            dest[:len(take)] = free[:len(take)]
            run.state, run.rows = _insert(run.state, run.rows, sub_state, rows, dest, spec=self._spec)
        except BaseException as e:  # these requests see it; the running rows go on
            for r in take:
                settle(r.future, error=e)
            return run
        hosts = []
        for i, (r, (e, n)) in enumerate(zip(take, hits)):
            h = _Row(r, self.tokenizer)
            h.shared = e.kv[:n // self._block] if e is not None else []
            slots[free[i]] = h
            hosts.append(h)
        outs.append((out, hosts))
        with self._lock:
            self.batches_run += 1
            self._counts.update(requests=len(take), prompt_tokens=sum(map(len, prompts)),
                                prefill_tokens=sum(len(p) - n for p, (_, n) in zip(prompts, hits)),
                                prefix_hits=sum(n > 0 for _, n in hits), prefix_tokens_saved=sum(n for _, n in hits))
        return self._admit(run, pending, slots, outs) if pending and None in slots else run

    @staticmethod
    def _consume_cols(out, cols: list) -> None:
        """Appends a chunk's tokens to the unfinished rows of its columns (None: a free slot)."""
        out = jax.device_get(out)
        toks, lps, slps = out["tokens"], out["logprobs"], out["sampled"]
        for i, h in enumerate(cols):
            if h is None:
                continue
            for t in range(toks.shape[0]):
                if h.finish is not None or toks[t, i] < 0:
                    break
                h.add(int(toks[t, i]), float(lps[t, i]), float(slps[t, i]))

    def _cache_len(self, need: int) -> int:
        return min(self._max_cache, _bucket(need, MIN_CACHE_BUCKET))

    def _cache_lens(self, max_len: int) -> list[int]:
        """Every cache length a batch needing at most `max_len` slots can get."""
        max_len = min(max_len, self.max_seq_len)
        needs = {1 << i for i in range(max_len.bit_length())} | {max_len}
        return sorted({self._cache_len(n) for n in needs})

    def _batch_sizes(self) -> list[int]:
        return sorted({min(_bucket(n), self.max_batch) for n in range(1, self.max_batch + 1)})

    def warmup(self, max_len: int | None = None, batch_sizes=None) -> int:
        """Compiles, by running them once on dummy rows, every executable that batches of
        `batch_sizes` rows (default: every batch bucket up to max_batch) needing at most `max_len`
        cache slots (default: max_seq_len) use: for each (batch, cache) bucket the empty cache,
        prefill, decode and the prefix cache's block copies. Those are all the shapes the engine
        makes (with up to MIN_STOP_ID_SLOTS stop ids a request), so traffic inside these bounds
        compiles nothing afterwards. Returns the number of (batch, cache) buckets."""
        sizes = self._batch_sizes() if batch_sizes is None else sorted({min(_bucket(n), self.max_batch)
                                                                         for n in batch_sizes})
        lens = self._cache_lens(self.max_seq_len if max_len is None else max_len)
        with self._lock:
            params = self._params
        mesh_ctx = jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()
        with mesh_ctx:
            for B in sizes:
                for S in lens:
                    W = _prefill_width(self._spec, B, S)
                    tokens, start, rows = _pack([], [], [], B, W)  # padding rows: one token, then done
                    rows = jax.device_put(rows)
                    done = np.zeros(B, bool)
                    state, out = self._device_batch(params, rows, tokens, start, [], B, S)
                    state, _ = _decode(params, rows, state, done, spec=self._spec)
                    block = _take_block(state["cache"], 0, 0, size=self._block)
                    # Two puts: the first lands on a fresh cache, the second on a put's output.
                    puts = [(min(1, B - 1), [block])] + [(0, [block] * min(2, S // self._block))]
                    state, out = self._device_batch(params, rows, tokens, start, puts, B, S)
                    state, _ = _decode(params, rows, state, done, spec=self._spec)
                    jax.block_until_ready(state)
            if self.scheduler == "continuous":
                self._warmup_continuous(params, sizes, lens)
        return len(sizes) * len(lens)

    def _warmup_continuous(self, params, sizes: list[int], lens: list[int]) -> None:
        """The continuous scheduler's own shapes: for each cache length S, the idle running batch
        (max_batch slots), an insert of each sub-batch size, a decode of every leading bucket, a
        slot move, a prefix block taken from the running batch, and the growth to the next cache
        length."""
        B = self.max_batch
        for i, S in enumerate(lens):
            state, rows = _idle_state(spec=self._spec, batch=B, length=S, ns=MIN_STOP_ID_SLOTS)
            for b in sizes:
                tokens, start, sub_rows = _pack([], [], [], b, _prefill_width(self._spec, b, S), ns=MIN_STOP_ID_SLOTS)
                sub_rows = jax.device_put(sub_rows)
                sub_state, _ = self._device_batch(params, sub_rows, tokens, start, [], b, S)
                state, rows = _insert(state, rows, sub_state, sub_rows, np.full(b, B, np.int32), spec=self._spec)
            state, _ = _decode(params, rows, state, np.ones(B, bool), spec=self._spec)
            for b in sizes:
                if b < B:
                    state, _ = _decode_lead(params, rows, state, np.ones(b, bool), spec=self._spec, b=b)
            state, rows = _move(state, rows, np.int32(0), np.int32(0), spec=self._spec)
            jax.block_until_ready(_take_block(state["cache"], 0, 0, size=self._block))
            if i + 1 < len(lens):
                state = _grow(state, spec=self._spec, length=lens[i + 1])
                # a grown batch takes inserts and decodes like a fresh one: the same executables
                tokens, start, sub_rows = _pack([], [], [], 1, _prefill_width(self._spec, 1, lens[i + 1]),
                                                ns=MIN_STOP_ID_SLOTS)
                sub_rows = jax.device_put(sub_rows)
                sub_state, _ = self._device_batch(params, sub_rows, tokens, start, [], 1, lens[i + 1])
                state, rows = _insert(state, rows, sub_state, sub_rows, np.full(1, B, np.int32), spec=self._spec)
                state, _ = _decode(params, rows, state, np.ones(B, bool), spec=self._spec)
            jax.block_until_ready(state)

    def _device_batch(self, params, rows, tokens, start, puts, B: int, S: int):
        """Empty cache, prefix blocks [(row, [block, ...])] copied in, prefill."""
        cache = _empty_cache(spec=self._spec, batch=B, length=S)
        # Committed, like every array computed from the (committed) params: jit keys its cache on
        # commitment too, and prefill would otherwise compile once for a fresh cache and again
        # for one that prefix blocks were copied into. On the array's own sharding: no copy.
        cache = jax.device_put(cache, jax.tree.map(lambda a: a.sharding, cache))
        for i, blocks in puts:
            for j, block in enumerate(blocks):
                cache = _put_block(cache, block, i, j * self._block, size=self._block)
        return _prefill(params, rows, cache, tokens, start, spec=self._spec)

    def _run_batch(self, batch: list[_Request]) -> list[GenerateResult]:
        prompts = [np.asarray(r.prompt, np.int32) for r in batch]
        with self._lock:  # the prefix KV must come from the weights this batch runs on
            params, version = self._params, self.policy_version
            hits = [self._prefix.match(p) for p in prompts]
        B = min(_bucket(len(batch)), self.max_batch)
        S = self._cache_len(max(len(r.prompt) + r.max_new for r in batch))
        tokens, start, rows = _pack(batch, prompts, [n for _, n in hits], B, _prefill_width(self._spec, B, S))
        hosts = [_Row(r, self.tokenizer) for r in batch]
        # Only the blocks holding the matched prefix: slots [0, n).
        puts = [(i, e.kv[:-(-n // self._block)]) for i, (e, n) in enumerate(hits) if e is not None]

        mesh_ctx = jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()
        with mesh_ctx:
            rows = jax.device_put(rows)
            state, out = self._device_batch(params, rows, tokens, start, puts, B, S)
            while True:
                # Dispatch the next chunk before reading this one, so the device never waits on
                # the host; at most one chunk is wasted once every row has finished.
                nxt = None
                if any(h.finish is None for h in hosts):
                    # Rows the host ended (stop strings) as a fixed-shape mask: no shape follows traffic.
                    ended = np.zeros(B, bool)
                    ended[[i for i, h in enumerate(hosts) if h.finish is not None]] = True
                    state, nxt = _decode(params, rows, state, ended, spec=self._spec)
                if not self._consume(hosts, out):
                    break
                out = nxt
            # Blocks wholly inside a row's matched prefix are the entry's own (prefill writes from
            # slot n on): the new entry shares them instead of copying them off the device again.
            shared = [e.kv[:n // self._block] if e is not None else [] for e, n in hits]
            self._remember(hosts, state["cache"], version, shared)
        with self._lock:
            self.batches_run += 1
            self._counts.update(requests=len(batch), prompt_tokens=sum(map(len, prompts)),
                                prefill_tokens=sum(len(p) - n for p, (_, n) in zip(prompts, hits)),
                                prefix_hits=sum(n > 0 for _, n in hits), prefix_tokens_saved=sum(n for _, n in hits))
        return [h.result(version) for h in hosts]

    def _remember(self, hosts: list[_Row], cache, version: int, shared: list[list], rows=None) -> None:
        """Stores each finished row's KV in the prefix cache (as whole blocks; `shared[i]`: row i's
        leading blocks, already on device), unless the weights changed meanwhile. hosts[i] is
        cache row rows[i] (default: i)."""
        if not self._prefix.capacity:
            return
        for j, h in enumerate(hosts):
            i = j if rows is None else rows[j]
            ids = np.asarray(h.req.prompt + h.ids[:-1], np.int32)  # the last sampled token was never fed
            with self._lock:
                if version != self.policy_version or self._prefix.covers(ids):
                    continue
            n_blocks = -(-len(ids) // self._block)
            kv = shared[j] + [_take_block(cache, i, k * self._block, size=self._block)
                              for k in range(len(shared[j]), n_blocks)]
            with self._lock:
                if version == self.policy_version:
                    self._prefix.add(ids, kv, n_blocks * self._block)

    @staticmethod
    def _consume(hosts: list[_Row], out) -> bool:
        """Appends a chunk's tokens to the unfinished rows; True while any row is unfinished."""
        out = jax.device_get(out)
        toks, lps, slps = out["tokens"], out["logprobs"], out["sampled"]
        for i, h in enumerate(hosts):
            for t in range(toks.shape[0]):
                if h.finish is not None or toks[t, i] < 0:
                    break
                h.add(int(toks[t, i]), float(lps[t, i]), float(slps[t, i]))
        return any(h.finish is None for h in hosts)


def engine_dtype(name: str) -> jnp.dtype:
    """`engine.dtype` -> weights / compute / cache dtype; "auto" = bfloat16 on GPU, else float32."""
    if name == "auto":
        return jnp.dtype(jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32)
    return jnp.dtype(name)
