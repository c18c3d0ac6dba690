"""An offline, deterministic user simulator that follows a task's scenario (tau2 `BaseUser`).

Its rules, in order, when the agent talks to it:
1. Its first message states the scenario: the reason for the call and the known info, rewritten
   to the first person ("You are Emma Kim." -> "I am Emma Kim.").
2. If the agent's text names one of the task's pending *user* actions (telecom: the user's own
   device tools, e.g. `toggle_airplane_mode`), it runs that action with the gold arguments as a
   user tool call; when the result comes back it reports it to the agent.
3. If the agent asks a question ("?"), it repeats what it knows.
4. Otherwise it is satisfied and ends the conversation (`###STOP###`).

So the gold agent (env.gold.GoldEngine) gets a complete conversation: opening, requested user
actions performed on the user side, and a stop after the final message. Any other agent gets
the same rules; an LLM user (tau2's UserSimulator) is the realistic alternative.
"""

from __future__ import annotations

import re

from tau2jax.env import tau2_env  # noqa: F401  (first: quiets tau2's import-time logging)

from tau2.data_model.message import MultiToolMessage, ToolCall, ToolMessage, UserMessage
from tau2.user.base import STOP, BaseUser, UserState
from tau2.user.user_simulator import UserSimulator

_FIRST_PERSON = [  # applied in order
    (r"\b[Yy]ou are\b", "I am"),
    (r"\b[Yy]ou were\b", "I was"),
    (r"\b[Yy]ou're\b", "I'm"),
    (r"\b[Yy]ou('ve|'d|'ll)\b", r"I\1"),
    (r"\b[Yy]ourself\b", "myself"),
    (r"\bYour\b", "My"),
    (r"\byour\b", "my"),
    (r"\b(to|for|with|told|tell|give|gave|help|ask|asks|asked|let) you\b", r"\1 me"),
    (r"\b[Yy]ou\b", "I"),
]


def first_person(text: str) -> str:
    """Rewrite tau2's second-person scenario text as the user's own words (best effort)."""
    for pattern, repl in _FIRST_PERSON:
        text = re.sub(pattern, repl, text)
    return text


class ScriptedUserState(UserState):
    opened: bool = False  # the scenario has been stated
    performed: list[str] = []  # action_ids of user actions already run


class ScriptedUser(BaseUser):
    def __init__(self, task):
        super().__init__(instructions=str(task.user_scenario.instructions))
        ec = task.evaluation_criteria
        self.user_actions = [a for a in (ec.actions or []) if a.requestor == "user"] if ec is not None else []
        instr = task.user_scenario.instructions
        if isinstance(instr, str):
            self.opening = first_person(instr.strip())
            self.known = ""
        else:
            self.known = first_person((instr.known_info or "").strip())
            self.opening = "\n".join(s for s in [first_person(instr.reason_for_call.strip()), self.known] if s)

    def get_init_state(self, message_history=None) -> ScriptedUserState:
        return ScriptedUserState(system_messages=[], messages=list(message_history or []))

    @classmethod
    def is_stop(cls, message: UserMessage) -> bool:
        return UserSimulator.is_stop(message)

    def _requested_action(self, text: str, state: ScriptedUserState):
        for a in self.user_actions:
            if a.action_id not in state.performed and a.name in text:
                return a
        return None

    def generate_next_message(self, message, state: ScriptedUserState):
        if isinstance(message, MultiToolMessage):
            results = message.tool_messages
        elif isinstance(message, ToolMessage):
            results = [message]
        else:
            results = []
        state.messages.extend(results or [message])

        if results:  # our own tool calls came back: report them
            names = {tc.id: tc.name for m in state.messages if isinstance(m, UserMessage) for tc in m.tool_calls or []}
            reply = UserMessage(
                role="user",
                content="\n".join(f"I ran {names.get(r.id, 'it')}. It returned:\n{r.content}" for r in results),
            )
        elif not state.opened:
            state.opened = True
            reply = UserMessage(role="user", content=f"Hi! {self.opening}")
        else:
            text = message.content or ""
            action = self._requested_action(text, state)
            if action is not None:
                state.performed.append(action.action_id)
                call = ToolCall(
                    id=f"user_call_{len(state.performed)}", name=action.name, arguments=dict(action.arguments), requestor="user"
                )
                reply = UserMessage(role="user", tool_calls=[call])
            elif "?" in text:
                reply = UserMessage(role="user", content=self.known or "I have no other details. Please go ahead.")
            else:
                reply = UserMessage(role="user", content=STOP)
        state.messages.append(reply)
        return reply, state
