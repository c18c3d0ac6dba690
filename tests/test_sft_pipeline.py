"""SFT JSONL reading/validation and the grain packing pipeline (tau2jax/data/{sft_data,pipeline}.py)."""

import collections
import json
import os

import grain
import numpy as np
import pytest

from tau2jax.data.chat import ChatFormat
from tau2jax.data.pipeline import make_sft_dataset
from tau2jax.data.sft_data import DataError, load_conversations, render_conversation
from tau2jax.data.tokenizer import load_tokenizer

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "data", "tiny_sft.jsonl")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def rendered(tok):
    chat = ChatFormat(tok)
    return [render_conversation(chat, c) for c in load_conversations([FIXTURE])]


def dataset(tok, files=(FIXTURE,), **kw):
    args = dict(max_len=2048, batch_size=4, seed=0, num_epochs=1, process_index=0, process_count=1)
    return make_sft_dataset(list(files), tok, **{**args, **kw})


def segments(batches):
    """Every packed conversation as (ids, mask over ids[1:]), checking the row layout on the way."""
    out = []
    for b in batches:
        assert set(b) == {"tokens", "targets", "loss_mask", "segment_ids", "positions"}
        for row in range(b["tokens"].shape[0]):
            seg, pos = b["segment_ids"][row], b["positions"][row]
            used = int((seg > 0).sum())
            assert (seg[:used] > 0).all() and (seg[used:] == 0).all()  # padding only at the end
            assert (b["loss_mask"][row][seg == 0] == 0).all() and (pos[seg == 0] == 0).all()
            ids_in_row = sorted(set(seg[:used].tolist()))
            assert ids_in_row == list(range(1, len(ids_in_row) + 1))
            for s in ids_in_row:
                idx = np.flatnonzero(seg == s)
                assert (np.diff(idx) == 1).all() and (pos[idx] == np.arange(len(idx))).all()
                tokens, targets = b["tokens"][row][idx], b["targets"][row][idx]
                # Targets are the next token of the same conversation, never of the next segment.
                assert (targets[:-1] == tokens[1:]).all()
                out.append((np.append(tokens, targets[-1]), b["loss_mask"][row][idx]))
    return out


def as_key(ids):
    return tuple(int(i) for i in ids)


def test_packing_covers_every_conversation_once_per_epoch(tok, rendered):
    ds = dataset(tok, num_epochs=2, batch_size=4)
    assert ds.stats.conversations == ds.stats.kept == len(rendered) and ds.stats.truncated == 0
    assert ds.stats.tokens == sum(len(ids) - 1 for ids, _ in rendered)
    assert ds.stats.loss_tokens == sum(int(m[1:].sum()) for _, m in rendered)
    batches = list(ds)
    for b in batches:
        assert all(v.shape == (4, 2048) and v.dtype == np.int32 for v in b.values())
    packed = segments(batches)
    assert collections.Counter(as_key(ids) for ids, _ in packed) == collections.Counter(
        as_key(ids) for ids, _ in rendered for _ in range(2))
    masks = {as_key(ids): mask for ids, mask in rendered}
    for ids, loss_mask in packed:
        # loss_mask marks positions whose target is an assistant token.
        assert (loss_mask == masks[as_key(ids)][1:]).all()
    # Several conversations share rows when they fit.
    small = segments(dataset(tok, max_len=4096, batch_size=2))
    assert len(small) == len(rendered)
    assert sum(b["segment_ids"].max() > 1 for b in dataset(tok, max_len=4096, batch_size=2)) > 0


def test_deterministic_for_a_seed(tok):
    def run(seed):
        return [b for b in dataset(tok, seed=seed, num_epochs=2, batch_size=2)]

    a, b, c = run(3), run(3), run(4)
    assert len(a) == len(b) and all((x[k] == y[k]).all() for x, y in zip(a, b) for k in x)
    assert any((x["tokens"] != y["tokens"]).any() for x, y in zip(a, c))


def test_iterator_state_restores_mid_stream(tok, tmp_path):
    import orbax.checkpoint as ocp

    ds = dataset(tok, max_len=1536, batch_size=2, num_epochs=3, seed=7)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    rest = list(it)
    assert len(rest) >= 3

    again = iter(dataset(tok, max_len=1536, batch_size=2, num_epochs=3, seed=7))
    again.set_state(state)
    restored = iter(dataset(tok, max_len=1536, batch_size=2, num_epochs=3, seed=7))
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    for resumed in (again, restored):
        tail = list(resumed)
        assert len(tail) == len(rest)
        assert all((x[k] == y[k]).all() for x, y in zip(rest, tail) for k in x)


def test_overlong_truncate_and_drop(tok, rendered):
    max_len = 1000
    lengths = [len(ids) for ids, _ in rendered]
    overlong = sum(n - 1 > max_len for n in lengths)
    assert 0 < overlong < len(rendered)

    ds = dataset(tok, max_len=max_len, overlong="truncate")
    assert (ds.stats.truncated, ds.stats.kept, ds.stats.dropped_overlong) == (overlong, len(rendered), 0)
    prefixes = {as_key(ids[: max_len + 1]) for ids, _ in rendered}
    packed = segments(ds)
    assert len(packed) == len(rendered) and all(as_key(ids) in prefixes for ids, _ in packed)

    ds = dataset(tok, max_len=max_len, overlong="drop")
    assert (ds.stats.truncated, ds.stats.kept, ds.stats.dropped_overlong) == (0, len(rendered) - overlong, overlong)
    short = {as_key(ids) for ids, _ in rendered if len(ids) - 1 <= max_len}
    assert {as_key(ids) for ids, _ in segments(ds)} == short

    with pytest.raises(DataError, match="no conversation fits max_len=300"):
        dataset(tok, max_len=300)


def test_truncation_that_leaves_no_loss_is_dropped(tok, tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]},
            {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = dataset(tok, files=[str(path)], max_len=100, batch_size=2)
    assert (ds.stats.conversations, ds.stats.kept, ds.stats.truncated, ds.stats.dropped_no_loss) == (2, 1, 1, 1)
    assert len(segments(ds)) == 1


def test_process_shards_are_slices_of_the_global_batch(tok):
    whole = list(dataset(tok, batch_size=4, num_epochs=2))
    parts = [list(dataset(tok, batch_size=4, num_epochs=2, process_index=p, process_count=2)) for p in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for g, a, b in zip(whole, *parts):
        assert all((np.concatenate([a[k], b[k]]) == g[k]).all() for k in g)
    with pytest.raises(ValueError, match="divisible"):
        dataset(tok, batch_size=3, process_count=2)


def test_bad_jsonl_names_file_and_line(tok, tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})

    def bad_line(line):
        path = tmp_path / "data.jsonl"
        path.write_text(good + "\n\n" + line + "\n")
        with pytest.raises(DataError) as e:
            load_conversations([str(path)])
        assert f"{path}:3" in str(e.value)
        return str(e.value)

    call = {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}
    assert "invalid JSON" in bad_line('{"messages": [')
    assert "messages[1].role" in bad_line(json.dumps({"messages": [{"role": "user", "content": "a"},
                                                                  {"role": "bot", "content": "b"}]}))
    assert "tool_calls[0].function.arguments" in bad_line(json.dumps(
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [call]}]}))
    assert "no assistant" in bad_line(json.dumps({"messages": [{"role": "user", "content": "a"}]}))
    assert "messages[0].content" in bad_line(json.dumps({"messages": [{"role": "user", "content": 3}]}))
    assert "tools" in bad_line(json.dumps({"messages": json.loads(good)["messages"], "tools": {"name": "f"}}))
    with pytest.raises(DataError, match="not found"):
        load_conversations([str(tmp_path / "missing.jsonl")])
    with pytest.raises(DataError, match="no file matches"):
        load_conversations([str(tmp_path / "*.none")])


def test_tools_as_json_string_render_the_same(tok, rendered, tmp_path):
    # Arrow-backed data sets store "tools" as a JSON string.
    with open(FIXTURE) as f:
        records = [json.loads(line) for line in f]
    path = tmp_path / "tools_as_string.jsonl"
    path.write_text("".join(json.dumps({**r, "tools": json.dumps(r["tools"])}) + "\n" for r in records))
    convs = load_conversations([str(tmp_path / "*.jsonl")])
    assert convs[0].source == f"{path}:1"
    chat = ChatFormat(tok)
    for conv, (ids, mask) in zip(convs, rendered, strict=True):
        got_ids, got_mask = render_conversation(chat, conv)
        assert (got_ids == ids).all() and (got_mask == mask).all()


def _token_record(ids, mask, **meta):
    return {"token_ids": [int(i) for i in ids], "loss_mask": [int(m) for m in mask], **meta}


@pytest.mark.parametrize("max_len,overlong", [(2048, "truncate"), (1000, "truncate"), (1000, "drop")])
def test_token_records_pack_like_the_conversations_they_render(tok, rendered, tmp_path, max_len, overlong):
    # Every other line a token record (the rendering of that line's conversation): a mixed file
    # must give the same stats and batch rows as the conversations alone.
    with open(FIXTURE) as f:
        lines = [line.strip() for line in f if line.strip()]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(
        (json.dumps(_token_record(*rendered[i], task="mock/x", reward=1.0)) if i % 2 else line) + "\n"
        for i, line in enumerate(lines)))  # fmt: skip
    kw = dict(max_len=max_len, overlong=overlong, batch_size=2, num_epochs=2, seed=5)
    want, got = dataset(tok, **kw), dataset(tok, files=[str(mixed)], **kw)
    assert got.stats == want.stats
    want_batches, got_batches = list(want), list(got)
    assert len(got_batches) == len(want_batches) > 0
    for a, b in zip(want_batches, got_batches):
        assert all((a[k] == b[k]).all() for k in a)


def test_bad_token_records_name_file_line_and_field(tok, tmp_path):
    good = json.dumps(_token_record([1, 2, 3], [0, 1, 1]))

    def bad_line(record):
        path = tmp_path / "tokens.jsonl"
        path.write_text(good + "\n" + json.dumps(record) + "\n")
        with pytest.raises(DataError) as e:
            dataset(tok, files=[str(path)])
        assert str(e.value).startswith(f"{path}:2: ")
        return str(e.value)

    (tmp_path / "ok.jsonl").write_text(good + "\n")
    (rec,) = load_conversations([str(tmp_path / "ok.jsonl")], tok.vocab_size)
    assert rec.token_ids.tolist() == [1, 2, 3] and rec.loss_mask.tolist() == [False, True, True]
    assert "loss_mask: has 2 items, token_ids 3" in bad_line(_token_record([1, 2, 3], [0, 1]))
    assert "loss_mask: item 1 is not 0 or 1" in bad_line(_token_record([1, 2, 3], [0, 2, 1]))
    assert f"token_ids: item 2 = {tok.vocab_size} is outside the vocabulary [0, {tok.vocab_size})" in bad_line(
        _token_record([1, 2, tok.vocab_size], [0, 1, 1]))
    assert "token_ids: item 0 = -1 is outside" in bad_line(_token_record([-1, 2, 3], [0, 1, 1]))
    assert "token_ids: item 1 is 2.0, not an integer" in bad_line({"token_ids": [1, 2.0, 3], "loss_mask": [0, 1, 1]})
    assert "loss_mask: item 0 is True, not an integer" in bad_line({"token_ids": [1, 2], "loss_mask": [True, 1]})
    assert "loss_mask: must be a non-empty list" in bad_line({"token_ids": [1, 2]})
    assert "no trained target" in bad_line(_token_record([1, 2, 3], [1, 0, 0]))
