"""A HF model directory's own chat template, rendered as SGLang's OpenAI chat endpoint renders it.

SGLang (entrypoints/openai/serving_chat.py `_apply_jinja_template`; 0.5.23 via
`_render_and_encode_chat_template`) calls the HF tokenizer's `apply_chat_template(messages,
add_generation_prompt=True, tools=...)` with the template the tokenizer loaded from the model dir
(managers/template_manager.py `_resolve_hf_chat_template`, 0.5.23: parser/template_manager.py),
then encodes the text without special tokens. transformers is only an optional dependency here, so
this renders the template with jinja2 in the environment transformers builds
(utils/chat_template_utils.py `_compile_jinja_template`: a sandbox, trim_blocks, lstrip_blocks,
loopcontrols, a `tojson` that does not HTML-escape, `raise_exception`, `strftime_now`) and with the
variables `apply_chat_template` passes (messages, tools, documents, add_generation_prompt, the
tokenizer's special tokens). tests/test_sglang_standin.py checks the text against transformers.

Where the template comes from, as transformers loads it: `chat_template.jinja` in the directory
(what transformers >= 4.50 saves) wins over the `chat_template` key of `tokenizer_config.json`;
that key may be a string, or a list of {"name", "template"} (named templates: "tool_use" when tools
are given, else "default"). No template: SGLang starts anyway ("No chat template found", a log line)
and every chat request fails with transformers' ValueError, a 400 (serving_base.py handle_request).
"""

from __future__ import annotations

import json
import os
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
# transformers tokenization_utils_base.py get_chat_template, word for word
NO_TEMPLATE_MESSAGE = (
    "Cannot use chat template functions because tokenizer.chat_template is not set and no template "
    "argument was passed! For information about writing templates and setting the "
    "tokenizer.chat_template attribute, please see the documentation at "
    "https://huggingface.co/docs/transformers/main/en/chat_templating")
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value):
    """A special token as tokenizer_config.json stores it (a string or an AddedToken dict)."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_chat_template(model_dir: str) -> str | dict[str, str] | None:
    """The directory's chat template as transformers would load it; None when it has none."""
    file = os.path.join(model_dir, CHAT_TEMPLATE_FILE)
    if os.path.isfile(file):
        with open(file, encoding="utf-8") as f:
            return f.read()
    config = _tokenizer_config(model_dir)
    template = config.get("chat_template")
    if isinstance(template, list):  # the older named-templates form
        template = {t["name"]: t["template"] for t in template}
    return template or None


def _tokenizer_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, TOKENIZER_CONFIG)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _compile(template: str):
    class Generation(jinja2.ext.Extension):  # `{% generation %}` (assistant masks): renders its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class HFChatTemplate:
    """`render(messages, tools)` = `AutoTokenizer.from_pretrained(dir).apply_chat_template(messages,
    tools=tools, add_generation_prompt=True, tokenize=False)`; the messages and tools are the ones
    SGLang hands to it (`sglang_messages`, `SGLangRules.template_tools`)."""

    def __init__(self, template: str | dict[str, str], special_tokens: dict[str, str] | None = None):
        self.template = template
        self.special_tokens = dict(special_tokens or {})
        self._compiled: dict[str, object] = {}

    @classmethod
    def from_dir(cls, model_dir: str) -> "HFChatTemplate | None":
        template = read_chat_template(model_dir)
        if template is None:
            return None
        config = _tokenizer_config(model_dir)
        special = {k: _token_text(config.get(k)) for k in _SPECIAL_TOKENS}
        return cls(template, {k: v for k, v in special.items() if v is not None})

    def _select(self, tools) -> str:  # transformers get_chat_template
        if isinstance(self.template, str):
            return self.template
        if tools is not None and "tool_use" in self.template:
            return self.template["tool_use"]
        if "default" in self.template:
            return self.template["default"]
        raise ValueError("This model has multiple chat templates with no default specified! Available template "
                         f"names are {sorted(self.template)}.")

    def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
               **kwargs) -> str:
        source = self._select(tools)
        if source not in self._compiled:
            self._compiled[source] = _compile(source)
        try:
            return self._compiled[source].render(messages=messages, tools=tools, documents=None,
                                                 add_generation_prompt=add_generation_prompt,
                                                 **{**self.special_tokens, **kwargs})
        except jinja2.exceptions.TemplateError as e:  # SGLang: a template error is the client's, 400
            raise ValueError(str(e)) from e


def sglang_messages(messages: list) -> list[dict]:
    """OpenAI messages as SGLang passes them to the template (serving_chat.py `_apply_jinja_template`,
    jinja_template_utils.py `process_content_for_template_format` with the "string" content format
    of text templates): content None -> "", a list of parts -> its text parts joined by " ", keys
    whose value is None dropped, an assistant tool call's JSON-string arguments parsed to a dict
    (bad JSON: ValueError, a 400)."""
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise TypeError(f"a message must be an object, got {m!r}")
        m = {**m, "content": "" if m.get("content") is None else m["content"]}
        if isinstance(m["content"], list):
            m["content"] = " ".join(p["text"] for p in m["content"] if isinstance(p, dict) and p.get("type") == "text")
        m = {k: v for k, v in m.items() if v is not None}
        if m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list):
            calls = []
            for call in m["tool_calls"]:
                if not isinstance(call, dict) or not isinstance(call.get("function") or {}, dict):
                    raise TypeError(f"a tool call must be an object with a function object, got {call!r}")
                fn = dict(call.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    fn["arguments"] = json.loads(fn["arguments"])
                calls.append({**call, "function": fn})
            m["tool_calls"] = calls
        out.append(m)
    return out


class MissingChatTemplate:
    """A model dir without a chat template: SGLang serves it, and every chat request gets
    transformers' ValueError as a 400."""

    def render(self, messages, tools=None, add_generation_prompt: bool = True, **kwargs) -> str:
        raise ValueError(NO_TEMPLATE_MESSAGE)
