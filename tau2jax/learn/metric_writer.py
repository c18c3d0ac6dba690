"""Metrics to TensorBoard event files, a JSONL log and the console; only process 0 writes."""

from __future__ import annotations

import json
import os

import jax


class MetricWriter:
    def __init__(self, workdir: str, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        self._jsonl = None
        if self.enabled:
            from tensorboardX import SummaryWriter  # tensorboardX (heavy): only a run that writes TensorBoard logs

            os.makedirs(workdir, exist_ok=True)
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            # Appended, not truncated: a resumed run continues the same log.
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in metrics.items()}
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
