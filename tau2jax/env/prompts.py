"""Prompt styles: how an agent turn is written, parsed, and how tool results come back.

- `recipe` (the published checkpoints' format): tools are text in the system prompt, never the
  chat template's tools block; every agent turn is exactly one
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` and nothing else, with two special
  actions: `respond` (its `content` is what the user sees) and `done` (ends the episode); tool
  results come back as *user* messages "Tool result for name(args):\\n...".
- `native` (Qwen3 native tool calling, tau2's own LLM agent): tau2's agent instructions + domain
  policy as the system prompt, tools in the chat template's tools block, free text to the user,
  tool calls as `<tool_call>` blocks (optionally after text), results as tool messages. The
  agent cannot end the episode; the user does (as with tau2's LLMAgent).

An agent turn is parsed into an `AgentAction`; output that cannot be parsed raises `FormatError`
and the episode runner issues the style's repair prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from tau2jax.env.tau2_env import DomainSpec


class FormatError(ValueError):
    """An agent output that is not a valid action in the prompt style."""


@dataclass
class AgentAction:
    kind: Literal["message", "tool_call", "stop"]
    content: str = ""  # message: the text for the user; tool_call (native only): text before the call
    name: str = ""  # tool_call: tool name
    arguments: dict = field(default_factory=dict)  # tool_call: arguments

    @classmethod
    def say(cls, text: str) -> "AgentAction":
        return cls("message", content=text)

    @classmethod
    def call(cls, name: str, arguments: dict) -> "AgentAction":
        return cls("tool_call", name=name, arguments=dict(arguments))


def tool_call_text(name: str, arguments: dict) -> str:
    """A tool call exactly as the Qwen3 chat template renders it (`tojson` = json.dumps, non-ASCII kept)."""
    return '<tool_call>\n{"name": "' + name + '", "arguments": ' + json.dumps(arguments, ensure_ascii=False) + "}\n</tool_call>"


def functional_call(name: str, arguments: dict) -> str:
    """`name(k='v', n=1)`: how the recipe names a call in "Tool result for ..." lines."""
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in arguments.items())})"


def _parse_calls(text: str, chat) -> tuple[str, list[dict]]:
    """(content outside the blocks, [{"name", "arguments": dict}]); ChatFormat checks the JSON."""
    content, calls, error = chat.parse_tool_calls(text)
    if error:
        raise FormatError(error)
    return content, calls


class PromptStyle:
    name: str

    def system_prompt(self, spec: DomainSpec) -> str:
        raise NotImplementedError

    def template_tools(self, spec: DomainSpec) -> list[dict]:
        """Tools for the chat template's tools block ([] = none)."""
        raise NotImplementedError

    def action_text(self, action: AgentAction) -> str:
        """The canonical assistant text of an action (gold demos, fixed turns)."""
        raise NotImplementedError

    def parse(self, text: str, chat) -> AgentAction:
        """Parse a sampled assistant turn (text without the closing <|im_end|>)."""
        raise NotImplementedError

    def assistant_message(self, action: AgentAction, text: str, call_id: str) -> dict:
        """The OpenAI-format record of an assistant turn whose text is `text`."""
        raise NotImplementedError

    def tool_result_message(self, action: AgentAction, call_id: str, content: str) -> dict:
        raise NotImplementedError

    def repair_message(self, error: str) -> dict:
        raise NotImplementedError

    def closing_action(self) -> AgentAction:
        """What a scripted agent plays once it has nothing left to say."""
        raise NotImplementedError


class RecipeStyle(PromptStyle):
    name = "recipe"

    def system_prompt(self, spec: DomainSpec) -> str:
        tools = [
            {
                "name": t["function"]["name"],
                "description": t["function"].get("description", ""),
                "parameters": t["function"].get("parameters", {"type": "object", "properties": {}}),
            }
            for t in spec.tools
        ]
        return f"""## Output Format
Every turn: exactly ONE tool call in this format:
<tool_call>
{{"name": "tool_name", "arguments": {{"param": "value"}}}}
</tool_call>

Special actions:
- respond: <tool_call>{{"name": "respond", "arguments": {{"content": "message"}}}}</tool_call>
- done: <tool_call>{{"name": "done", "arguments": {{}}}}</tool_call>

---

You are a {spec.name} customer support agent. Complete the user's task following the policy below.

{spec.policy}

## Available Tools
{json.dumps(tools, indent=2, ensure_ascii=False)}

## Rules
- One tool call per turn, nothing before or after it (no plain text responses)
- Talk to the user only through respond; its content is all the user sees
- Authenticate the user before any state change
- Get explicit confirmation before modifications
- Communicate all relevant details to the user
- Call done as soon as the task is complete
"""

    def template_tools(self, spec: DomainSpec) -> list[dict]:
        return []

    def action_text(self, action: AgentAction) -> str:
        if action.kind == "message":
            return tool_call_text("respond", {"content": action.content})
        if action.kind == "stop":
            return tool_call_text("done", {})
        return tool_call_text(action.name, action.arguments)

    def parse(self, text: str, chat) -> AgentAction:
        content, calls = _parse_calls(text, chat)
        if len(calls) != 1:
            raise FormatError(f"expected exactly one <tool_call> block, found {len(calls)}")
        if content.strip():
            raise FormatError("text outside the <tool_call> block")
        name, args = calls[0]["name"], calls[0]["arguments"]
        if name == "respond":
            msg = args.get("content")
            if not isinstance(msg, str) or not msg.strip():
                raise FormatError("respond needs a non-empty string 'content'")
            return AgentAction.say(msg)
        if name == "done":
            return AgentAction("stop")
        return AgentAction.call(name, args)

    def assistant_message(self, action: AgentAction, text: str, call_id: str) -> dict:
        return {"role": "assistant", "content": text}

    def tool_result_message(self, action: AgentAction, call_id: str, content: str) -> dict:
        return {"role": "user", "content": f"Tool result for {functional_call(action.name, action.arguments)}:\n{content}"}

    def repair_message(self, error: str) -> dict:
        return {
            "role": "user",
            "content": f"FORMAT ERROR ({error}). Re-output EXACTLY one action in the required format: "
            '<tool_call>{"name": "...", "arguments": {...}}</tool_call>. Nothing else.',
        }

    def closing_action(self) -> AgentAction:
        return AgentAction("stop")


class NativeStyle(PromptStyle):
    name = "native"

    def system_prompt(self, spec: DomainSpec) -> str:
        from tau2.agent.llm_agent import AGENT_INSTRUCTION, SYSTEM_PROMPT  # tau2 (heavy): imported on first use

        return SYSTEM_PROMPT.format(agent_instruction=AGENT_INSTRUCTION, domain_policy=spec.policy)

    def template_tools(self, spec: DomainSpec) -> list[dict]:
        return list(spec.tools)

    def action_text(self, action: AgentAction) -> str:
        if action.kind == "message":
            return action.content
        if action.kind == "tool_call":
            call = tool_call_text(action.name, action.arguments)
            return f"{action.content}\n{call}" if action.content else call
        raise ValueError("the native style has no stop action; the user ends the episode")

    def parse(self, text: str, chat) -> AgentAction:
        content, calls = _parse_calls(text, chat)
        if len(calls) > 1:
            raise FormatError(f"one tool call per turn, found {len(calls)}")
        if calls:
            return AgentAction("tool_call", content=content.strip(), name=calls[0]["name"], arguments=calls[0]["arguments"])
        if not content.strip():
            raise FormatError("empty message")
        return AgentAction.say(content.strip())

    def assistant_message(self, action: AgentAction, text: str, call_id: str) -> dict:
        if action.kind != "tool_call":
            return {"role": "assistant", "content": action.content}
        return {
            "role": "assistant",
            "content": action.content,
            "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": action.name, "arguments": action.arguments}}
            ],
        }

    def tool_result_message(self, action: AgentAction, call_id: str, content: str) -> dict:
        return {"role": "tool", "tool_call_id": call_id, "name": action.name, "content": content}

    def repair_message(self, error: str) -> dict:
        return {
            "role": "user",
            "content": f"FORMAT ERROR ({error}). Either reply to the user in plain text, or call exactly one tool as "
            '<tool_call>\n{"name": "...", "arguments": {...}}\n</tool_call> with valid JSON.',
        }

    def closing_action(self) -> AgentAction:
        return AgentAction.say("Thank you for contacting us. Have a great day!")


STYLES = {"recipe": RecipeStyle, "native": NativeStyle}


def get_style(name: str) -> PromptStyle:
    if name not in STYLES:
        raise ValueError(f"unknown prompt style {name!r}; known: {sorted(STYLES)}")
    return STYLES[name]()
