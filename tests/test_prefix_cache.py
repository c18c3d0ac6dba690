"""The built-in engine's prefix cache: reused KV gives the same tokens and log-probs as recomputing
it, hits are counted, weight updates empty it, the LRU keeps its slot bound, and after warmup()
no traffic compiles."""

import concurrent.futures
import contextlib

import jax
import numpy as np
import pytest

from tau2jax.inference.engine import SamplingParams
from tau2jax.inference.jax_engine import JaxEngine, PrefixCache
from tau2jax.models import qwen3
from tau2jax.models.configs import get_model_config

VOCAB = 512
KW = dict(max_seq_len=128, max_batch=4, decode_chunk=8)
PROMPTS = [[int(t) for t in np.random.RandomState(s).randint(0, VOCAB, n)] for s, n in ((0, 5), (1, 12), (2, 20))]
PARAMS = [SamplingParams(temperature=0.0, max_new_tokens=16),
          SamplingParams(temperature=1.0, max_new_tokens=16, seed=1),
          SamplingParams(temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=16, seed=2)]


@pytest.fixture(scope="module")
def model():
    cfg = get_model_config("tiny", vocab_size=VOCAB)
    return qwen3.init_params(cfg, jax.random.key(0)), cfg


def next_turn(prompts, results, extra):
    """Each conversation continued: prompt + output + a few new (user / tool) tokens."""
    return [p + r.output_ids + extra for p, r in zip(prompts, results)]


def assert_same(got, want):
    for g, w in zip(got, want):
        assert g.output_ids == w.output_ids
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5, rtol=0)
        np.testing.assert_allclose(g.sampled_logprobs, w.sampled_logprobs, atol=1e-5, rtol=0)


def test_prefix_cache_gives_the_same_results_as_recomputing(model):
    params, cfg = model
    cached = JaxEngine(params, cfg, prefix_cache_tokens=4096, **KW)
    plain = JaxEngine(params, cfg, **KW)
    turn1 = cached.generate(PROMPTS, PARAMS)
    assert_same(turn1, plain.generate(PROMPTS, PARAMS))
    assert cached.stats()["prefix_entries"] == 3 and cached.stats()["prefix_hits"] == 0

    turn2 = next_turn(PROMPTS, turn1, [7, 8, 9])
    # + a prompt sharing only the first 3 tokens of one conversation, and a repeat of a whole one
    # (its last token is prefilled anyway: it yields the first new token's logits)
    prompts = turn2 + [PROMPTS[1][:3] + [1, 2]]
    params = PARAMS + [PARAMS[1]]
    assert_same(cached.generate(prompts, params), plain.generate(prompts, params))
    repeat = cached.generate([turn2[0]], PARAMS[0])
    assert_same(repeat, plain.generate([turn2[0]], PARAMS[0]))

    stats = cached.stats()
    saved = [len(p) + len(r.output_ids) - 1 for p, r in zip(PROMPTS, turn1)] + [3, len(turn2[0]) - 1]
    assert stats["prefix_hits"] == 5 and stats["prefix_tokens_saved"] == sum(saved)
    assert stats["prefill_tokens"] == stats["prompt_tokens"] - sum(saved)
    # each turn-2 entry extends its turn-1 entry, which it replaced
    assert stats["prefix_entries"] == 4 and plain.stats()["prefix_entries"] == 0
    cached.close(), plain.close()


def test_update_weights_empties_the_prefix_cache(model):
    params, cfg = model
    engine = JaxEngine(params, cfg, prefix_cache_tokens=4096, **KW)
    turn1 = engine.generate(PROMPTS, PARAMS)
    rng = np.random.default_rng(3)
    new = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32), params)
    engine.update_weights(new)
    assert engine.stats()["prefix_entries"] == 0
    turn2 = next_turn(PROMPTS, turn1, [7, 8, 9])
    fresh = JaxEngine(new, cfg, **KW)
    assert_same(engine.generate(turn2, PARAMS), fresh.generate(turn2, PARAMS))
    assert engine.stats()["prefix_hits"] == 0
    engine.close(), fresh.close()


def entry(*ids):
    return np.array(ids, np.int32)


def test_lru_keeps_the_slot_bound_and_drops_superseded_entries():
    cache = PrefixCache(capacity=600)
    cache.add(entry(1, 2, 3), kv="a", slots=256)
    cache.add(entry(4, 5), kv="b", slots=256)
    assert cache.match(entry(1, 2, 9))[1] == 2  # longest common prefix; touches entry a
    assert cache.match(entry(1, 2, 3))[1] == 2  # a whole match leaves the last token to prefill
    assert cache.match(entry(8, 9)) == (None, 0)
    cache.add(entry(6,), kv="c", slots=256)  # over 600 slots: evicts b, the least recently used
    assert cache.match(entry(4, 5, 6)) == (None, 0) and len(cache) == 2 and cache.slots == 512
    assert cache.covers(entry(1, 2)) and not cache.covers(entry(1, 2, 3, 4))
    cache.add(entry(1, 2, 3, 4), kv="d", slots=256)  # extends a: replaces it
    assert len(cache) == 2 and cache.match(entry(1, 2, 3, 4, 5))[0].kv == "d"
    cache.add(entry(7,), kv="e", slots=1024)  # larger than the whole cache: not stored
    assert len(cache) == 2
    cache.clear()
    assert (len(cache), cache.slots) == (0, 0)


@contextlib.contextmanager
def count_compiles():
    """Every XLA compile in the block, in any thread (jitted engine functions and eager ops alike)."""
    names = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        from jax._src import monitoring
        monitoring.unregister_event_duration_listener(listener)


def test_no_compiles_after_warmup(model):
    """warmup() compiles every shape the engine makes: afterwards batches of any size, prompts of
    any length, prefix hits (one or several blocks) and misses, stop ids, host-side stops and
    cache buckets all run on compiled code."""
    params, cfg = model
    engine = JaxEngine(params, cfg, prefix_cache_tokens=8192, max_seq_len=512, max_batch=2, decode_chunk=8)
    assert engine.warmup() == 2 * 2  # batch buckets 1, 2 x cache buckets 256, 512
    rng = np.random.RandomState(7)
    prompt = lambda n: [int(t) for t in rng.randint(0, VOCAB, n)]  # noqa: E731
    sp = lambda s, n=12, **kw: SamplingParams(temperature=1.0, max_new_tokens=n, seed=s, **kw)  # noqa: E731
    with count_compiles() as compiles:
        first = [prompt(5), prompt(40), prompt(300)]
        turn1 = engine.generate(first, [sp(0), sp(1), sp(2, n=40)])  # batches of 2 and 1, cache 512
        engine.generate([prompt(3)], sp(3, n=7, stop_token_ids=(1, 2, 3)))  # batch 1, cache 256
        convs = next_turn(first, turn1, prompt(30))
        engine.generate(convs[:2], sp(4))  # hits within one block, batch 2
        engine.generate([convs[2], prompt(50)], [sp(5, n=60), sp(6)])  # a hit of two blocks, a miss
        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # whatever batches the threads make
            list(pool.map(lambda i: engine.generate([convs[i % 3] + [i]], sp(i, n=5 + i)), range(6)))
        engine.generate([prompt(20)], sp(9, n=9, stop_token_ids=tuple(range(8))))  # 8 stop ids
    assert engine.stats()["prefix_hits"] >= 3
    assert compiles == [], compiles
    engine.close()


def test_a_next_turn_shares_the_matched_blocks_and_still_equals_recomputing(model):
    """A turn that extends a cached conversation past a whole prefix block: the new entry reuses
    the entry's device blocks for that prefix (no copy off the device) and every later turn still
    equals the engine without a prefix cache."""
    params, cfg = model
    kw = dict(max_seq_len=512, max_batch=2, decode_chunk=8)
    cached, plain = JaxEngine(params, cfg, prefix_cache_tokens=4096, **kw), JaxEngine(params, cfg, **kw)
    p = SamplingParams(temperature=0.0, max_new_tokens=8)
    prompts = [[int(t) for t in np.random.RandomState(5).randint(0, VOCAB, 300)]]
    for turn in range(3):
        got, want = cached.generate(prompts, p), plain.generate(prompts, p)
        assert_same(got, want)
        entry = cached._prefix.match(np.asarray(prompts[0] + list(got[0].output_ids) + [1], np.int32))[0]
        if turn:  # the conversation's first 256-slot block is the same device array as last turn's
            assert entry.kv[0] is first_block
        first_block = entry.kv[0]
        prompts = next_turn(prompts, got, [3, 4, 5])
    assert cached.stats()["prefix_hits"] == 2
    cached.close(), plain.close()
