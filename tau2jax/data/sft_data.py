"""SFT conversations from JSONL: one conversation per line, OpenAI chat format (as public tau2 SFT
sets are published):

    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str|null,
                   "tool_calls": [{"id": .., "type": "function",
                                   "function": {"name": str, "arguments": {..} | "<json object>"}}],
                   "tool_call_id": .., "name": ..}, ...],
     "tools": [{"type": "function", "function": {"name", "description", "parameters"}}, ...]}

"tools" is optional and may also be a JSON string (how Arrow-backed data sets store it). Every
problem is reported as `path:line: where: what`. String arguments stay verbatim, as the chat
template inserts them; they must still parse to a JSON object.
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


def read_jsonl(path: str) -> list[Conversation]:
    if not os.path.isfile(path):
        raise DataError(f"{path}: SFT data file not found")
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
            out.append(validate_conversation(obj, where))
    return out


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


def load_conversations(files: str | Sequence[str]) -> list[Conversation]:
    """All conversations of `files` (globs allowed), in file then line order."""
    paths = expand_files(files)
    if not paths:
        raise DataError("no SFT data files given")
    return [conv for path in paths for conv in read_jsonl(path)]


def render_conversation(chat: ChatFormat, conv: Conversation) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [n], loss_mask bool [n]) of one conversation."""
    try:
        ids, mask = chat.render(conv.messages, conv.tools)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{conv.source}: cannot render ({e})") from e
    return np.asarray(ids, np.int32), np.asarray(mask, bool)
