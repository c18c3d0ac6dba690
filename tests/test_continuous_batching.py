"""JaxEngine(scheduler="continuous"): requests admitted into and retired from a running batch
between decode chunks, with the static scheduler's results (greedy and seeded), per-row policy
versions across a swap, context limits, bad-prompt isolation, 0 compiles after warm-up, and the
server's Batcher handing requests straight to it."""

import concurrent.futures
import dataclasses
import time

import jax
import numpy as np
import pytest

from tau2jax.data.tokenizer import load_tokenizer
from tau2jax.inference.engine import ContextLengthError, SamplingParams
from tau2jax.inference import jax_engine
from tau2jax.inference.jax_engine import JaxEngine
from tau2jax.inference.server import Batcher
from tau2jax.models import qwen3
from tau2jax.models.configs import get_model_config

CFG = dataclasses.replace(get_model_config("tiny"), vocab_size=512)
KW = dict(max_seq_len=64, max_batch=4, decode_chunk=4, prefix_cache_tokens=512)
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=20)


def prompt(seed, n):
    return [int(t) for t in np.random.RandomState(seed).randint(0, CFG.vocab_size, n)]


@pytest.fixture(scope="module")
def engines():
    params = qwen3.init_params(CFG, jax.random.key(0))
    tok = load_tokenizer("")
    static = JaxEngine(params, CFG, tokenizer=tok, **KW)
    cont = JaxEngine(params, CFG, tokenizer=tok, scheduler="continuous", **KW)
    cont.warmup()  # the static shapes as well: compiled code is shared by engines of one config
    yield dict(static=static, cont=cont, params=params, tok=tok)
    static.close(), cont.close()


def slow_chunks(engine, monkeypatch, seconds=0.03):
    """Makes each decode chunk's read take `seconds` on the host, so that a row runs for a while."""
    consume = engine._consume_cols

    def slow(out, cols):
        time.sleep(seconds)
        consume(out, cols)

    monkeypatch.setattr(engine, "_consume_cols", slow)


def wait_admitted(engine, n, timeout=30.0):
    deadline = time.monotonic() + timeout
    while engine.stats()["requests"] < n:
        assert time.monotonic() < deadline
        time.sleep(0.002)


def test_default_is_static_and_bad_scheduler_refused(engines):
    assert engines["static"].scheduler == "static" and not engines["static"].batches_itself
    assert engines["cont"].batches_itself
    with pytest.raises(ValueError, match="scheduler"):
        JaxEngine(engines["params"], CFG, scheduler="dynamic", **KW)


def test_request_admitted_mid_batch_finishes_first_and_matches_static(engines, monkeypatch):
    cont, static = engines["cont"], engines["static"]
    eng = JaxEngine(engines["params"], CFG, scheduler="continuous", **KW)
    slow_chunks(eng, monkeypatch)
    long_p, short_p = prompt(1, 5), prompt(2, 9)
    long_sp, short_sp = SamplingParams(temperature=0.0, max_new_tokens=48), SamplingParams(temperature=0.0, max_new_tokens=3)
    long_f = eng.submit(long_p, long_sp)
    wait_admitted(eng, 1)
    short_f = eng.submit(short_p, short_sp)
    short = short_f.result(timeout=60)
    assert not long_f.done()  # admitted into the running batch, retired while the long row goes on
    long = long_f.result(timeout=60)
    assert eng.batches_run == 2  # two admissions into one running batch
    want = static.generate([long_p, short_p], [long_sp, short_sp])
    assert [long.output_ids, short.output_ids] == [r.output_ids for r in want]
    assert (len(long.output_ids), len(short.output_ids)) == (48, 3)
    np.testing.assert_allclose(long.logprobs, want[0].logprobs, atol=1e-5)
    eng.close()
    # More requests than slots: the rest wait for free slots, results as the static scheduler's.
    prompts = [prompt(10 + i, 3 + 5 * i) for i in range(7)]
    sps = [SamplingParams(temperature=0.0, max_new_tokens=2 + 7 * (i % 3)) for i in range(7)]
    got = [f.result() for f in [cont.submit(p, sp) for p, sp in zip(prompts, sps)]]
    assert [r.output_ids for r in got] == [r.output_ids for r in static.generate(prompts, sps)]


def test_retired_slots_compacted_and_decode_follows_the_occupied_rows(engines, monkeypatch):
    # Rows 0 and 2 of four finish first: the last row moves down into slot 0, and the two left
    # decode as a batch of 2 (the leading slots), with the static scheduler's tokens and log-probs.
    eng = JaxEngine(engines["params"], CFG, scheduler="continuous", **KW)
    moves, widths = [], []
    move, lead = jax_engine._move, jax_engine._decode_lead
    monkeypatch.setattr(jax_engine, "_move", lambda st, rows, src, dst, spec: (
        moves.append((int(src), int(dst))), move(st, rows, src, dst, spec=spec))[1])
    monkeypatch.setattr(jax_engine, "_decode_lead", lambda *a, b, spec: (widths.append(b), lead(*a, spec=spec, b=b))[1])
    ps = [prompt(40 + i, 4 + 3 * i) for i in range(4)]
    sps = [SamplingParams(temperature=0.0, max_new_tokens=m) for m in (3, 40, 3, 30)]
    got = eng.generate(ps, sps)
    want = engines["static"].generate(ps, sps)
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)
    assert moves[0] == (3, 0) and 2 in widths
    eng.close()


def test_admitted_row_shares_a_running_rows_prompt(engines, monkeypatch):
    # Nothing has finished (the prefix cache is empty), but a running row's prompt KV is in the
    # running cache: a request sharing its first 30 tokens prefills only the rest.
    eng = JaxEngine(engines["params"], CFG, scheduler="continuous", **KW)
    slow_chunks(eng, monkeypatch)
    first = prompt(50, 36)
    second = first[:30] + prompt(51, 5)
    first_f = eng.submit(first, SamplingParams(temperature=0.0, max_new_tokens=24))
    wait_admitted(eng, 1)
    got = eng.submit(second, SamplingParams(temperature=0.0, max_new_tokens=3)).result(timeout=60)
    assert not first_f.done()
    st = eng.stats()
    assert (st["prefix_hits"], st["prefix_tokens_saved"]) == (1, 30)
    want = engines["static"].generate([second], SamplingParams(temperature=0.0, max_new_tokens=3))[0]
    assert got.output_ids == want.output_ids
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    first_f.result(timeout=60)
    eng.close()


def test_swap_while_rows_run(engines, monkeypatch):
    params = engines["params"]
    rng = np.random.default_rng(3)
    new = jax.tree.map(lambda x: (np.asarray(x) + 0.05 * rng.standard_normal(x.shape)).astype(np.float32), params)
    eng = JaxEngine(params, CFG, scheduler="continuous", **KW)
    slow_chunks(eng, monkeypatch)
    old_p, new_p = prompt(4, 6), prompt(5, 8)
    sp = SamplingParams(temperature=0.0, max_new_tokens=40)
    old_f = eng.submit(old_p, sp)
    wait_admitted(eng, 1)
    eng.update_weights(new, version=5)
    assert not old_f.done()  # the swap landed while the row ran
    new_f = eng.submit(new_p, sp)
    old, fresh = old_f.result(timeout=60), new_f.result(timeout=60)
    # The running row finished on the params it began with; the new one waited for it to drain.
    assert (old.policy_version, fresh.policy_version) == (0, 5)
    ref_old = JaxEngine(params, CFG, **KW)
    ref_new = JaxEngine(new, CFG, **KW)
    assert old.output_ids == ref_old.generate([old_p], sp)[0].output_ids
    assert fresh.output_ids == ref_new.generate([new_p], sp)[0].output_ids
    assert eng.stats()["prefix_hits"] == 0  # nothing from the old weights serves the new ones
    for e in (eng, ref_old, ref_new):
        e.close()


def test_context_limit_row_ends_while_others_continue(engines):
    cont, static = engines["cont"], engines["static"]
    prompts = [list(range(1, KW["max_seq_len"] - 3)), prompt(6, 4), prompt(7, 10)]
    sps = [SamplingParams(temperature=0.0, max_new_tokens=100), GREEDY,
           SamplingParams(temperature=0.0, max_new_tokens=30)]
    got = cont.generate(prompts, sps)
    assert [(len(r.output_ids), r.finish_reason) for r in got] == [(4, "length"), (20, "length"), (30, "length")]
    assert [r.output_ids for r in got] == [r.output_ids for r in static.generate(prompts, sps)]
    with pytest.raises(ContextLengthError):
        cont.submit(list(range(KW["max_seq_len"])), GREEDY)


def test_malformed_prompt_fails_alone(engines):
    cont = engines["cont"]
    good = [prompt(8, 5), prompt(9, 12)]
    futures = [cont.submit(p, GREEDY) for p in good]
    for bad in ([], [CFG.vocab_size + 3], [-1, 2]):
        with pytest.raises(ValueError):
            cont.submit(bad, GREEDY)
    with pytest.raises(ValueError):
        cont.submit(good[0], SamplingParams(top_p=0.0))
    assert [len(f.result(timeout=60).output_ids) for f in futures] == [20, 20]
    # Through the server's Batcher (direct to the engine): the bad one's future fails, not the others'.
    batcher = Batcher(cont)
    assert batcher.direct
    fs = [batcher.submit(good[0], GREEDY), batcher.submit([CFG.vocab_size], GREEDY), batcher.submit(good[1], GREEDY)]
    assert isinstance(fs[1].exception(timeout=60), ValueError)
    assert [f.result(timeout=60).output_ids for f in (fs[0], fs[2])] == [f.result().output_ids for f in futures]
    assert batcher.last_output_t > 0 and batcher.pending() == 0
    batcher.close()


def test_seed_gives_same_tokens_in_any_batch_and_scheduler(engines):
    cont, static = engines["cont"], engines["static"]
    p = prompt(11, 7)
    sp = SamplingParams(temperature=1.0, top_k=50, max_new_tokens=16, seed=123)
    alone = cont.generate([p], sp)[0]
    others = [prompt(12 + i, 3 + 4 * i) for i in range(5)]
    osp = [SamplingParams(temperature=1.0, max_new_tokens=4 + 3 * i, seed=i) for i in range(5)]
    # in the middle of a crowd, submitted concurrently, and in the static scheduler's batches
    crowd = [f.result() for f in [cont.submit(q, s) for q, s in zip(others[:3] + [p] + others[3:],
                                                                    osp[:3] + [sp] + osp[3:])]][3]
    st = static.generate([p] + others[:2], [sp] + osp[:2])[0]
    assert alone.output_ids == crowd.output_ids == st.output_ids
    np.testing.assert_allclose(alone.logprobs, st.logprobs, atol=1e-5)
    np.testing.assert_allclose(alone.sampled_logprobs, crowd.sampled_logprobs, atol=1e-5)
    # a later turn (a longer prompt), same seed: fresh noise
    later = cont.generate([p + alone.output_ids], sp)[0]
    assert later.output_ids != alone.output_ids


def test_no_compiles_after_warmup_for_a_mixed_workload(engines):
    cont, static, tok = engines["cont"], engines["static"], engines["tok"]
    counts = cont.compile_counts
    assert set(counts) == {"prefill", "decode", "idle", "insert", "grow", "decode_lead", "move"}
    base = [prompt(20 + i, 2 + 6 * i) for i in range(6)]
    sps = [SamplingParams(temperature=0.7 * (i % 3), top_p=0.9, top_k=i, max_new_tokens=3 + 5 * i, seed=i,
                          stop_token_ids=tuple(range(500, 500 + 2 * i + 1))) for i in range(6)]  # up to 11 ids
    sps[2] = dataclasses.replace(sps[2], stop_strings=("zz",))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        first = list(pool.map(lambda a: cont.generate([a[0]], a[1])[0], zip(base, sps)))
        # next turns: extend each conversation (prefix-cache hits), arriving at different times
        second = list(pool.map(lambda a: cont.generate([a[0] + a[1].output_ids[:-1] + [7]], a[2])[0],
                               zip(base, first, sps)))
    assert cont.compile_counts == counts
    assert cont.stats()["prefix_hits"] > 0
    want = static.generate(base, sps)
    greedy = [i for i, s in enumerate(sps) if s.temperature == 0]
    assert [first[i].output_ids for i in greedy] == [want[i].output_ids for i in greedy]
    assert all(r.output_ids for r in second)


def test_grown_cache_and_close():
    """A long request joining a batch of short ones grows the running cache one bucket: warmed,
    no compile; close() lets queued requests finish and refuses later ones."""
    params = qwen3.init_params(CFG, jax.random.key(1))
    kw = dict(KW, max_seq_len=512, max_batch=2, prefix_cache_tokens=0)
    eng = JaxEngine(params, CFG, scheduler="continuous", **kw)
    eng.warmup(batch_sizes=[1, 2])
    counts = eng.compile_counts
    assert counts["grow"] >= 1
    static = JaxEngine(params, CFG, **kw)
    ps = [prompt(30, 5), prompt(31, 300), prompt(32, 9)]
    sps = [SamplingParams(temperature=0.0, max_new_tokens=m) for m in (30, 6, 4)]
    fs = [eng.submit(p, sp) for p, sp in zip(ps, sps)]
    got = [f.result(timeout=120) for f in fs]
    assert eng.compile_counts == counts
    assert [r.output_ids for r in got] == [r.output_ids for r in static.generate(ps, sps)]
    late = eng.submit(ps[0], sps[0])
    eng.close()
    assert late.result(timeout=60).output_ids == got[0].output_ids
    with pytest.raises(RuntimeError):
        eng.submit(ps[0], sps[0]).result()
    static.close()
