"""Trajectories -> packed learner rows, token-exact.

The learner trains on what the engine sampled: each trajectory's own `token_ids`, `loss_mask`,
`behaviour_logprobs` and `turns`, never re-rendered messages (the stored messages are normalised
text). A trajectory of n ids becomes n-1 (token, target) pairs, one segment of a packed row
(grain's first-fit packing, as SFT), with per-target arrays:

    tokens, targets, positions, segment_ids (0 = padding)   as the SFT batch
    loss_mask           1 where the target was sampled by the policy in a trained turn
    behaviour_logprobs  the engine's log-prob of the target (convention: GenerateResult)
    temperature         the sampling temperature of the target's turn (T = 0 is stored as 1: greedy
                        log-probs are log_softmax(logits))
    advantages          the trajectory's advantage on every target (masked by loss_mask)
    policy_version      the weights' version that sampled the target (-1 elsewhere)
    group               the trajectory's group index (-1 on padding)

Turns that failed to parse (kind "malformed", mask 0 in the trajectory) stay masked, or with
`malformed_turns="nonpositive"` are trained when their episode's advantage is negative: a
malformed output is pushed down when its episode did badly and never reinforced when a repair
went on to win.
Turns cut by the length limit (finish_reason "length") are masked unless `keep_length_cut`.
A trajectory longer than `max_len` pairs is truncated (its tail loses the loss) or dropped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import grain
import numpy as np

from tau2jax.env.trajectory import Trajectory

FLOAT_FIELDS = ("behaviour_logprobs", "temperature", "advantages")
INT_FIELDS = ("tokens", "targets", "loss_mask", "policy_version", "group")


@dataclass(frozen=True)
class BatchConfig:
    max_len: int  # pairs per packed row
    overlong: str = "truncate"  # truncate | drop
    keep_length_cut: bool = False  # train turns that hit max_new_tokens
    malformed_turns: str = "mask"  # mask | nonpositive (trained only with a negative advantage)
    row_multiple: int = 1  # rows padded to a multiple of this (data-parallel size × micro-batches)


@dataclass
class BatchStats:
    trajectories: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_loss: int = 0
    length_cut_turns_masked: int = 0
    loss_tokens: int = 0
    rows: int = 0


def trajectory_example(traj: Trajectory, advantage: float, group: int, *, keep_length_cut: bool,
                       malformed_turns: str = "mask") -> tuple[dict, int]:
    """-> (per-target arrays of one trajectory, number of length-cut turns masked)."""
    ids = np.asarray(traj.token_ids, np.int32)
    mask = np.asarray(traj.loss_mask, np.int32)
    n = len(ids) - 1
    temperature = np.ones(n, np.float32)
    version = np.full(n, -1, np.int32)
    masked_cut = 0
    for turn in traj.turns:
        s, e = turn["start"] - 1, turn["end"] - 1  # target j predicts ids[j + 1]
        t = turn.get("temperature", 1.0)
        temperature[s:e] = t if t and t > 0 else 1.0
        version[s:e] = turn["policy_version"]
        if turn.get("kind") == "malformed":  # only ever pushed down: trained iff the advantage is negative
            mask[turn["start"]:turn["end"]] = malformed_turns == "nonpositive" and advantage < 0
        if turn.get("finish_reason") == "length" and not keep_length_cut and mask[turn["start"]:turn["end"]].any():
            mask[turn["start"]:turn["end"]] = 0
            masked_cut += 1
    loss_mask = mask[1:]
    return {
        "tokens": ids[:-1], "targets": ids[1:], "loss_mask": loss_mask,
        "behaviour_logprobs": np.asarray(traj.behaviour_logprobs, np.float32)[1:] * loss_mask,
        "temperature": temperature, "advantages": np.float32(advantage) * loss_mask.astype(np.float32),
        "policy_version": version, "group": np.full(n, group, np.int32),
    }, masked_cut  # fmt: skip


def _cut(example: dict, n: int) -> dict:
    return {k: v[:n] for k, v in example.items()}


def pack(examples: list[dict], max_len: int) -> list[dict]:
    """First-fit packing of per-target examples into rows of `max_len` (grain, as the SFT pipeline)."""
    ds = grain.MapDataset.source(examples).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    length = {k: max_len for k in examples[0]}
    ds = grain.experimental.FirstFitPackIterDataset(ds, length_struct=length, num_packing_bins=max(1, len(examples)),
                                                    shuffle_bins=False)
    rows = []
    for row in ds:
        out = {k: row[k] for k in examples[0]}
        out["segment_ids"], out["positions"] = row["tokens_segment_ids"], row["tokens_positions"]
        rows.append(out)
    return rows


def _rows_bucket(n: int, multiple: int) -> int:
    """Rows padded to a power of two (bounded recompiles), then to a multiple of `multiple`."""
    b = 1 << max(0, (n - 1).bit_length())
    return -(-b // multiple) * multiple


def build_batch(items: list[tuple[Trajectory, float, int]], cfg: BatchConfig,
                agree_rows: Callable[[int], int] | None = None) -> tuple[dict | None, BatchStats]:
    """items: (trajectory, advantage, group index). -> (dict of [R, max_len] arrays | None, stats).

    Padding rows/positions are 0 (`group`/`policy_version` -1, `temperature` 1). `agree_rows`:
    this process's packed row count -> the count every process pads to (the largest), so the
    processes' rows form one global batch; None when every process has 0 rows."""
    stats = BatchStats(trajectories=len(items))
    examples = []
    for traj, adv, group in items:
        ex, masked_cut = trajectory_example(traj, adv, group, keep_length_cut=cfg.keep_length_cut,
                                            malformed_turns=cfg.malformed_turns)
        stats.length_cut_turns_masked += masked_cut
        if len(ex["tokens"]) > cfg.max_len:
            if cfg.overlong == "drop":
                stats.dropped_overlong += 1
                continue
            ex = _cut(ex, cfg.max_len)
            stats.truncated += 1
        if not ex["loss_mask"].any():
            stats.dropped_no_loss += 1
            continue
        examples.append(ex)
    rows = pack(examples, cfg.max_len) if examples else []
    n = agree_rows(len(rows)) if agree_rows is not None else len(rows)
    if not n:
        return None, stats
    n_rows = _rows_bucket(n, cfg.row_multiple)
    batch = {}
    for k in [*INT_FIELDS, *FLOAT_FIELDS, "segment_ids", "positions"]:
        fill = {"temperature": 1.0, "policy_version": -1, "group": -1}.get(k, 0)
        dtype = np.float32 if k in FLOAT_FIELDS else np.int32
        arr = np.full((n_rows, cfg.max_len), fill, dtype)
        for i, row in enumerate(rows):
            arr[i] = row[k]
        batch[k] = arr
    # grain pads packed rows with 0: restore the fills on the padded positions of real rows
    pad = batch["segment_ids"] == 0
    batch["temperature"][pad], batch["policy_version"][pad], batch["group"][pad] = 1.0, -1, -1
    stats.loss_tokens = int(batch["loss_mask"].sum())
    stats.rows = n_rows
    return batch, dataclasses.replace(stats)
