"""SFT records from JSONL, one per line, of two kinds (a file may mix them); and tau2 Results
files (`*.json`, from `tau2 run` or our eval), whose successful simulations become conversations
(`tau2jax.eval.tau2_results.sft_records`: the domain's system prompt and tool schema).

A conversation, in OpenAI chat format (as public tau2 SFT sets are published), rendered here with
the chat template:

    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str|null,
                   "tool_calls": [{"id": .., "type": "function",
                                   "function": {"name": str, "arguments": {..} | "<json object>"}}],
                   "tool_call_id": .., "name": ..}, ...],
     "tools": [{"type": "function", "function": {"name", "description", "parameters"}}, ...]}

"tools" is optional and may also be a JSON string (how Arrow-backed data sets store it). Every
problem is reported as `path:line: where: what`. String arguments stay verbatim, as the chat
template inserts them; they must still parse to a JSON object.

A token record, trained on exactly as written (never re-rendered): the ids a policy saw and
sampled, e.g. a kept RFT trajectory, with its mask over the same ids (1 = trained, as target):

    {"token_ids": [int, ...], "loss_mask": [0|1, ...], ...metadata (task, reward, source, ...)}
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Sequence

import numpy as np

from tau2jax.data.chat import ROLES, ChatFormat


class DataError(ValueError):
    """A data file is missing or a line is not a valid conversation."""


@dataclasses.dataclass(frozen=True)
class Conversation:
    messages: list[dict]
    tools: list[dict] | None
    source: str  # "path:line", for error messages and debugging


def _json_value(value, where: str):
    """Public SFT sets store some fields as JSON strings: decode those, pass anything else through."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: string is not valid JSON ({e})") from e


def _check_tool_call(call, where: str) -> None:
    if not isinstance(call, dict):
        raise DataError(f"{where}: must be an object, got {type(call).__name__}")
    fn = call.get("function") or call
    if not isinstance(fn, dict):
        raise DataError(f"{where}.function: must be an object")
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise DataError(f"{where}.function.name: must be a non-empty string")
    args = _json_value(fn.get("arguments"), f"{where}.function.arguments")
    if not isinstance(args, dict):
        raise DataError(f"{where}.function.arguments: must be a JSON object (dict or JSON string), "
                        f"got {type(args).__name__}")


def _check_tools(tools, where: str) -> list[dict] | None:
    if tools is None:
        return None
    tools = _json_value(tools, f"{where}.tools")
    if not isinstance(tools, list):
        raise DataError(f"{where}.tools: must be a list, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DataError(f"{where}.tools[{i}]: must be an object with a function name "
                            '({"type": "function", "function": {"name": ..., "parameters": ...}})')
    return tools


def validate_conversation(obj, where: str) -> Conversation:
    """Checks one decoded JSONL record; `where` ("path:line") prefixes every error."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: \"messages\" must be a non-empty list")
    has_assistant = False
    for i, msg in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(msg, dict):
            raise DataError(f"{at}: must be an object, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise DataError(f"{at}.role: {role!r} is not one of {ROLES}")
        content = msg.get("content")
        if not (isinstance(content, str) or (content is None and role == "assistant")):
            raise DataError(f"{at}.content: must be a string (null only for assistant turns), "
                            f"got {type(content).__name__}")
        calls = msg.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list):
                raise DataError(f"{at}.tool_calls: only assistant messages carry tool_calls, as a list")
            for j, call in enumerate(calls):
                _check_tool_call(call, f"{at}.tool_calls[{j}]")
        has_assistant |= role == "assistant"
    if not has_assistant:
        raise DataError(f"{where}: no assistant message, so nothing to train on")
    return Conversation(messages=messages, tools=_check_tools(obj.get("tools"), where), source=where)


@dataclasses.dataclass(frozen=True)
class TokenRecord:
    token_ids: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # bool [n]
    source: str  # "path:line"


def validate_token_record(obj: dict, where: str, vocab_size: int | None = None) -> TokenRecord:
    """Checks a {"token_ids", "loss_mask"} record: equal lengths, 0/1 mask, ids in [0, vocab_size)."""
    arrays = {}
    for name in ("token_ids", "loss_mask"):
        value = obj.get(name)
        if not isinstance(value, list) or not value:
            raise DataError(f"{where}: {name}: must be a non-empty list of integers")
        bad = next((i for i, v in enumerate(value) if type(v) is not int), None)  # bool is not an id
        if bad is not None:
            raise DataError(f"{where}: {name}: item {bad} is {value[bad]!r}, not an integer")
        arrays[name] = np.asarray(value, np.int64)
    ids, mask = arrays["token_ids"], arrays["loss_mask"]
    if len(ids) != len(mask):
        raise DataError(f"{where}: loss_mask: has {len(mask)} items, token_ids {len(ids)}; they must align")
    if not np.isin(mask, (0, 1)).all():
        raise DataError(f"{where}: loss_mask: item {int(np.flatnonzero(~np.isin(mask, (0, 1)))[0])} is not 0 or 1")
    out_of_range = (ids < 0) | (ids >= vocab_size if vocab_size is not None else False)
    if out_of_range.any():
        i = int(np.flatnonzero(out_of_range)[0])
        raise DataError(f"{where}: token_ids: item {i} = {int(ids[i])} is outside the vocabulary "
                        f"[0, {vocab_size if vocab_size is not None else 'inf'})")
    if not mask[1:].any():
        raise DataError(f"{where}: loss_mask: no trained target (mask is 0 after the first id), nothing to train on")
    return TokenRecord(token_ids=ids.astype(np.int32), loss_mask=mask.astype(bool), source=where)


def validate_record(obj, where: str, vocab_size: int | None = None) -> Conversation | TokenRecord:
    """A decoded JSONL line of either kind; "token_ids" marks a token record."""
    if isinstance(obj, dict) and "token_ids" in obj:
        return validate_token_record(obj, where, vocab_size)
    return validate_conversation(obj, where)


def read_jsonl(path: str, vocab_size: int | None = None,
               prompt_style: str = "native") -> list[Conversation | TokenRecord]:
    """A JSONL data file's records; a tau2 Results file's successful simulations in `prompt_style`
    (tau2.prompt_style: the system prompt and tools as the policy is served them)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: SFT data file not found")
    if path.endswith(".json"):  # a tau2 Results file (`tau2 run`, our eval): its successful simulations
        return _read_tau2_results(path, prompt_style)
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e})") from e
            out.append(validate_record(obj, where, vocab_size))
    if not out:
        raise DataError(f"{path}: the SFT data file is empty (no records); write one JSON conversation per line, "
                        "or leave the file out of data.train_files")
    return out


def _read_tau2_results(path: str, prompt_style: str) -> list[Conversation]:
    from tau2jax.eval import tau2_results  # imports tau2 (seconds), which plain JSONL data never needs

    try:
        recs = tau2_results.sft_records(path, prompt_style)
    except tau2_results.Tau2ResultsError as e:
        raise DataError(str(e)) from None
    return [validate_conversation(r, r["source"]) for r in recs]


def expand_files(files: str | Sequence[str]) -> list[str]:
    """Paths in the given order; each glob pattern expands to its sorted matches."""
    if isinstance(files, str):
        files = [files]
    out = []
    for pattern in files:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise DataError(f"{pattern}: no file matches this pattern")
            out += matches
        else:
            out.append(pattern)
    return out


def load_conversations(files: str | Sequence[str], vocab_size: int | None = None,
                       prompt_style: str = "native") -> list[Conversation | TokenRecord]:
    """All records of `files` (globs allowed), in file then line order; token ids are checked
    against `vocab_size` when given."""
    paths = expand_files(files)
    if not paths:
        raise DataError("no SFT data files given")
    return [rec for path in paths for rec in read_jsonl(path, vocab_size, prompt_style)]


def render_conversation(chat: ChatFormat | None, conv: Conversation | TokenRecord) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [n], loss_mask bool [n]) of one record: a conversation rendered, a token record as is.
    `chat` None (no tokenizer): token records only."""
    if isinstance(conv, TokenRecord):
        return conv.token_ids, conv.loss_mask
    if chat is None:
        raise DataError(f"{conv.source}: a conversation, but this model has no tokenizer; give token records")
    try:
        ids, mask = chat.render(conv.messages, conv.tools)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{conv.source}: cannot render ({e})") from e
    return np.asarray(ids, np.int32), np.asarray(mask, bool)
