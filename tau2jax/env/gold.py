"""The gold agent: a task's expected actions played as an engine (demos, gold-replay tests, the
eval's `gold` engine); and the null agent, which only apologises (the eval's do-nothing floor)."""

from __future__ import annotations

from tau2jax.env.prompts import AgentAction
from tau2jax.env.tau2_env import initial_messages
from tau2jax.inference.engine import FixedEngine, _finish, per_prompt


def user_action_request(name: str, arguments: dict) -> str:
    """How the gold agent asks the user to act on their own device (telecom dual control)."""
    args = ", ".join(f"{k}={v!r}" for k, v in arguments.items())
    return f"Could you please run `{name}`{f' with {args}' if args else ''} on your phone and tell me the result?"


def gold_final_message(task) -> str:
    """The gold agent's last message: it states every `communicate_info` string verbatim."""
    ec = task.evaluation_criteria
    info = [s.strip() for s in (ec.communicate_info or [])] if ec is not None else []
    if ec is not None and not ec.actions:  # nothing to do: these tasks test that the agent declines
        head = "I have reviewed your request, but I'm not able to make that change under our policy."
    else:
        head = "Your request has been taken care of."
    return head + (f" For your information: {'; '.join(info)}." if info else "")


def gold_script(task) -> list:
    """The gold agent's turns for a task: each expected action in order (an agent action as a tool
    call, a user action as a request that the user run it), then `gold_final_message`."""
    ec = task.evaluation_criteria
    turns = []
    for a in (ec.actions or []) if ec is not None else []:
        if a.requestor == "assistant":
            turns.append(AgentAction.call(a.name, a.arguments))
        else:
            turns.append(AgentAction.say(user_action_request(a.name, a.arguments)))
    turns.append(AgentAction.say(gold_final_message(task)))
    return turns


class GoldEngine(FixedEngine):
    """Plays a task's gold agent turns (`gold_script`) in the prompt style's exact text.

    Build one per task. It keeps no per-episode state: the turn to play is the number of assistant
    turns in the prompt minus those the episode starts with (tau2's greeting, or the task's
    message history), so retries and parallel samples of the same task need no reset. Past the
    script it plays the style's closing action (recipe: `done`).
    """

    kind = "gold"

    def __init__(self, task, style, chat, policy_version: int = 0, *, script=None, closing=None):
        """script / closing: the turns to play and the one after them (default: the task's gold
        script, then the style's closing action)."""
        from tau2.data_model.message import AssistantMessage  # tau2 (heavy): imported on first use

        tok = chat.tokenizer
        self.policy_version = policy_version

        def ids(action):
            return tok.encode(style.action_text(action)) + [tok.im_end_id]

        self._turns = [ids(a) for a in (gold_script(task) if script is None else script)]
        self._closing = ids(closing or style.closing_action())
        # `<|im_start|>assistant` opens every assistant turn, sampled or not
        self._opener = list(chat.generation_prompt())[:2]
        self._n_fixed = sum(isinstance(m, AssistantMessage) for m in initial_messages(task))

    def _count_assistant_turns(self, ids: list[int]) -> int:
        a, b = self._opener
        return sum(1 for x, y in zip(ids, ids[1:]) if x == a and y == b)

    def generate(self, input_ids, params):
        results = []
        for prompt, p in zip(input_ids, per_prompt(params, len(input_ids))):
            # the prompt ends with the generation header, which is not a finished turn
            k = self._count_assistant_turns(prompt) - 1 - self._n_fixed
            ids = self._turns[k] if 0 <= k < len(self._turns) else self._closing
            results.append(_finish(ids, p, self.policy_version))
        return results


NULL_AGENT_MESSAGE = "I'm sorry, I can't help with that."


class NullEngine(GoldEngine):
    """The do-nothing agent: every turn is a polite `NULL_AGENT_MESSAGE`, in the prompt style's text
    (native: a plain message; recipe: `respond`, then the style's closing `done`). What it passes
    is the floor an evaluation's Pass@k must be read against (tau2 rewards some tasks for doing
    nothing)."""

    kind = "null"

    def __init__(self, task, style, chat, policy_version: int = 0):
        sorry, closing = AgentAction.say(NULL_AGENT_MESSAGE), style.closing_action()
        # a style whose closing action is a message (native) keeps apologising instead
        super().__init__(task, style, chat, policy_version, script=[sorry],
                         closing=closing if closing.kind == "stop" else sorry)
