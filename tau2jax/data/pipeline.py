"""SFT input pipeline (grain): JSONL records -> packed, batched rows of next-token examples.

    files --load/validate/render (once, eagerly)--> (ids, loss_mask) per record
          --overlong: truncate | drop (counted in `.stats`)-->
          MapDataset --shuffle(seed, reshuffled per epoch)--> repeat(num_epochs)
          --> (tokens, targets, loss_mask) --FirstFitPackIterDataset--> rows of max_len
          --> global batch (last one padded with empty rows) --> this process's rows

Batches are dicts of numpy int32 arrays [batch_size / process_count, max_len]:

    tokens       input ids
    targets      the next id of the same conversation (tokens shifted left by one)
    loss_mask    1 where the TARGET is a trained (assistant) id
    segment_ids  1..n for the conversations packed in a row, 0 = padding
    positions    0.. restarting at every conversation

Both record kinds of `sft_data` (conversations, rendered here; token records, taken as written)
go through the same steps below; "conversation" there means either.
A conversation of n ids becomes n-1 (token, target) pairs, built before packing, so a target never
comes from the next conversation in the row and the loss never crosses a segment boundary.
Padding is 0 in every array. `max_len` counts pairs: a conversation fits if it has <= max_len + 1 ids.

Rendering happens up front: data errors surface (with file and line) before any compilation, and the
over-long counts are known before training. Every process runs the same pipeline and keeps its own
contiguous slice of each global batch: all processes see the same number of steps (packing each
process's own conversations would give them different step counts and deadlock a multi-host run),
and the global batch does not depend on the number of processes.

Global batch i is the same for every process count, so a resumed run needs no saved iterator state:
`SFTDataset.iterator(start=step)` positions a fresh one at the checkpoint's step (any process count).
The iterator is a grain DatasetIterator (`get_state()`/`set_state()` also resume it exactly).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import grain
import numpy as np

from tau2jax.data.chat import ChatFormat
from tau2jax.data.sft_data import DataError, load_conversations, render_conversation

OVERLONG_MODES = ("truncate", "drop")


@dataclasses.dataclass(frozen=True)
class DataStats:
    """Counts over one pass of the files (one epoch)."""
    conversations: int  # records read from the files (both kinds)
    kept: int  # that go into training
    truncated: int  # kept, cut to max_len + 1 ids
    dropped_overlong: int  # overlong="drop"
    dropped_no_loss: int  # truncation left no trained target
    tokens: int  # (token, target) pairs kept
    loss_tokens: int  # of those, trained


class SFTDataset(grain.IterDataset):
    """The pipeline's last stage, carrying `stats`; iterate it for a checkpointable iterator."""

    def __init__(self, parent: grain.IterDataset, stats: DataStats):
        super().__init__(parent)
        self.stats = stats

    def __iter__(self) -> grain.DatasetIterator:
        return self._parent.__iter__()

    def iterator(self, start: int = 0) -> grain.DatasetIterator:
        """An iterator positioned at global batch `start` (a resumed run's step): the batches before
        it are built and dropped. The position is a function of the step alone, so a run resumes
        under any process count; skipping costs host-side packing only (grain has no skip for an
        iterator over packed rows, whose count per element is only known by packing)."""
        it = iter(self)
        for done in range(start):
            if next(it, None) is None:
                raise DataError(f"the data ends after {done} batches, before batch {start}: the data files or "
                                "data.* settings changed since that step was checkpointed")
        return it

    def __str__(self) -> str:
        return f"SFTDataset({self.stats})"


def prepare_examples(conversations, chat: ChatFormat, *, max_len: int, overlong: str):
    """Rendered (ids, mask) per kept conversation, and the counts."""
    examples, truncated, dropped_overlong, dropped_no_loss = [], 0, 0, 0
    for conv in conversations:
        ids, mask = render_conversation(chat, conv)
        if len(ids) - 1 > max_len:
            if overlong == "drop":
                dropped_overlong += 1
                continue
            ids, mask = ids[: max_len + 1], mask[: max_len + 1]
            truncated += 1
            if not mask[1:].any():
                dropped_no_loss += 1
                continue
        examples.append((ids, mask))
    stats = DataStats(
        conversations=len(conversations), kept=len(examples), truncated=truncated,
        dropped_overlong=dropped_overlong, dropped_no_loss=dropped_no_loss,
        tokens=sum(len(ids) - 1 for ids, _ in examples),
        loss_tokens=sum(int(mask[1:].sum()) for _, mask in examples))
    return examples, stats


def _next_token_example(example):
    ids, mask = example
    return {"tokens": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:].astype(np.int32)}


def _rekey(row):
    return {"tokens": row["tokens"], "targets": row["targets"], "loss_mask": row["loss_mask"],
            "segment_ids": row["tokens_segment_ids"], "positions": row["tokens_positions"]}


def _local_rows(batch, *, start: int, stop: int):
    return {k: v[start:stop] for k, v in batch.items()}


def make_sft_dataset(files: str | Sequence[str], tokenizer, *, max_len: int, batch_size: int, seed: int,
                     num_epochs: int = 1, overlong: str = "truncate", shuffle: bool = True,
                     process_index: int | None = None, process_count: int | None = None,
                     vocab_size: int | None = None, prompt_style: str = "native") -> SFTDataset:
    """Packed SFT batches; see the module docstring. `batch_size` is the global number of rows.
    `tokenizer` None: token records only (a model without a text vocabulary, the toy game's),
    ids checked against `vocab_size`.

    Deterministic for a seed; `seed` must be in [0, 2**32). The number of batches is
    ceil(packed rows / batch_size) and is the same on every process.
    """
    if process_index is None or process_count is None:
        import jax  # only when not given: keeps the data module usable without a backend

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if overlong not in OVERLONG_MODES:
        raise ValueError(f"overlong={overlong!r}: must be one of {OVERLONG_MODES}")
    if max_len < 1 or batch_size < 1 or num_epochs < 1:
        raise ValueError(f"max_len ({max_len}), batch_size ({batch_size}) and num_epochs ({num_epochs}) "
                         "must be >= 1")
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes ({process_count})")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")

    records = load_conversations(files, tokenizer.vocab_size if tokenizer is not None else vocab_size, prompt_style)
    examples, stats = prepare_examples(records, ChatFormat(tokenizer) if tokenizer is not None else None,
                                       max_len=max_len, overlong=overlong)
    if not examples:
        raise DataError(f"{files}: no conversation fits max_len={max_len} ({stats}); "
                        "raise data.max_len or use data.overlong='truncate'")

    ds = grain.MapDataset.source(examples)
    if shuffle:
        ds = ds.shuffle(seed)  # per-epoch seeds: seed + epoch (grain's ShuffleMapDataset)
    ds = ds.repeat(num_epochs).map(_next_token_example)
    # Elements are in memory already: reader threads would only contend for the GIL.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    length = {"tokens": max_len, "targets": max_len, "loss_mask": max_len}
    ds = grain.experimental.FirstFitPackIterDataset(ds, length_struct=length, num_packing_bins=batch_size,
                                                    seed=seed, shuffle_bins=shuffle)
    ds = ds.map(_rekey)
    ds = ds.batch(batch_size, batch_fn=functools.partial(grain.experimental.batch_and_pad, batch_size=batch_size))
    local = batch_size // process_count
    ds = ds.map(functools.partial(_local_rows, start=process_index * local, stop=(process_index + 1) * local))
    return SFTDataset(ds, stats)
