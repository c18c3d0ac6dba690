"""A training stage's final weights, in the converted-weights layout engines and later stages load.

`{workdir}/params` is a symlink to `{workdir}/params-step{N}/` (`params/` Orbax + `model_config.json`
+ `export.json` with the step + `hf_extra/`: the tokenizer and config files of the checkpoint the
run started from, so `orbax_to_hf` makes a directory SGLang can launch from). Each export writes a new step directory and then swaps the link with
one `os.replace`, so a reader sees the old weights or the new ones, never a half-written mix, and a
run continued to more steps always exports its new final step. Older step directories are removed.
"""

from __future__ import annotations

import json
import os
import shutil

import jax

from tau2jax.weights import orbax_params
from tau2jax.weights.hf_read import EXTRA_FILES, HF_EXTRA_DIR

LINK = "params"
INFO_FILE = "export.json"


def exported_step(workdir: str) -> int | None:
    """The step of the weights `{workdir}/params` holds now (None: nothing exported yet)."""
    info = os.path.join(workdir, LINK, INFO_FILE)
    if not os.path.isfile(info):
        return None
    with open(info) as f:
        return int(json.load(f)["step"])


def export_params(workdir: str, params, model_cfg, step: int, extra_dir: str | None = None) -> str:
    """Write `params` as the export of `step` (collective on multi-host); -> the `params` path.
    `extra_dir`: where the HF files beside the weights come from (`EXTRA_FILES` found there)."""
    link = os.path.join(os.path.abspath(workdir), LINK)
    if exported_step(workdir) == step:
        return link
    target = f"params-step{step}"
    step_dir = os.path.join(os.path.dirname(link), target)
    if jax.process_index() == 0 and os.path.isdir(step_dir):
        shutil.rmtree(step_dir)  # left by a crash before the link moved: never read, safe to redo
    orbax_params.save_params(step_dir, params, model_cfg)
    if jax.process_index() == 0:
        orbax_params.write_json_atomic(os.path.join(step_dir, INFO_FILE), {"step": step})
        _copy_extra(extra_dir, os.path.join(step_dir, HF_EXTRA_DIR))
        if os.path.isdir(link) and not os.path.islink(link):  # an export from before the link layout
            shutil.rmtree(link)
        tmp_link = f"{link}.tmp-{os.getpid()}"
        os.symlink(target, tmp_link)
        os.replace(tmp_link, link)
        for name in os.listdir(os.path.dirname(link)):
            if name.startswith("params-step") and name != target:
                shutil.rmtree(os.path.join(os.path.dirname(link), name), ignore_errors=True)
    return link


def _copy_extra(src: str | None, dst: str) -> None:
    names = [n for n in EXTRA_FILES if src and os.path.isfile(os.path.join(src, n))]
    if names:
        os.makedirs(dst, exist_ok=True)
        for n in names:
            shutil.copy2(os.path.join(src, n), os.path.join(dst, n))
