"""The episode runner: one tau2 task, played by an engine against a user simulator, scored by tau2.

It follows tau2's Orchestrator message protocol (agent -> user/env, user -> agent/env, env ->
whoever called; the same step counting, max_steps / max_errors termination and sync_tools), but
the agent side is token-in/token-out:

- The conversation is rendered turn by turn with the ChatFormat; each agent turn sends the ids so
  far plus the generation header to the engine and appends the sampled ids as they are (never
  re-tokenized) with mask 1 and their behaviour log-probs.
- Generation stops at `</tool_call>` or `<|im_end|>`. After a `</tool_call>` stop (or a length
  cut) the runner appends `<|im_end|>` as a forced token (mask 0); the `\\n` closing each turn is
  forced too.
- The sampled text is parsed by the prompt style (prompts.py). Unparseable output is counted
  (`num_format_errors`, also toward max_errors), its turn becomes kind "malformed" with mask 0
  (its behaviour log-probs kept, so a learner may push it down: `rl.batch.malformed_turns`), and it is
  answered with the style's repair prompt (mask 0); the regenerated turn is marked kind "repair"
  with mask 0, so it is never trained as if sampled. If every repair fails too, the episode ends as
  tau2's AGENT_ERROR (reward 0). No malformed output is ever trained toward by SFT on the record.
- Tool calls run in the tau2 environment; an unknown tool or bad arguments get tau2's own error
  tool message ("Error: ...") and are counted (`num_tool_errors`), and the episode goes on.
- User turns come from any tau2 `BaseUser` (scripted_user.ScriptedUser, tau2's LLM
  UserSimulator, ...). User tool calls (telecom device actions) run on the user side and are
  invisible to the agent, as in tau2.
- Scoring builds a tau2 SimulationRun from the tau2 messages (ToolCall / ToolMessage ids match)
  and calls tau2's evaluate_simulation (rewards.evaluate); the policy's calls are audited against
  the expected actions (rewards.audit_calls, `call_audit`) for the precision-aware partial score.
- A prompt longer than the engine's context (ContextLengthError) ends the episode as tau2's
  AGENT_ERROR with `context_exhausted` set: scored (0), not retried.
- Any other exception from the engine, the user simulator or the evaluator (or an engine "abort") ends
  the episode as an infrastructure error: `infra_error` set, `termination_reason` "infra_error",
  reward None. It is never scored as a model failure; callers retry it.

Thread safety: every call builds its own environment; run episodes on threads freely as long as
the engine and user objects tolerate concurrent calls (GoldEngine and ScriptedUser do).
"""

from __future__ import annotations

import dataclasses
import time
import traceback
import zlib
from collections import defaultdict

from tau2jax.env import prompts, rewards, tau2_env
from tau2jax.inference.engine import ContextLengthError, Engine, SamplingParams
from tau2jax.env.trajectory import INFRA_ERROR, Trajectory, turn_record

# tau2 (heavy) is imported inside the functions that use it: importing this module stays cheap

_AGENT, _USER, _ENV = "agent", "user", "env"
_STOP_STRINGS = ("</tool_call>",)


class _InfraError(Exception):
    pass


def _guard(what: str, fn, *args):
    try:
        return fn(*args)
    except ContextLengthError:
        raise  # the conversation outgrew the model: ends the episode, not an infrastructure fault
    except Exception as e:  # noqa: BLE001  (any failure outside the policy is infrastructure)
        tb = traceback.format_exc(limit=3)
        raise _InfraError(f"{what}: {type(e).__name__}: {e}\n{tb}") from e


class _Conversation:
    """The policy's view: token ids, loss mask, log-probs and OpenAI-format messages, in step."""

    def __init__(self, chat, traj: Trajectory):
        self.chat, self.traj = chat, traj
        self.prev_role = None
        self.im_end = chat.tokenizer.im_end_id
        # A turn the model closed itself (either EOS): no `<|im_end|>` is forced after it.
        self.end_of_turn = set(chat.tokenizer.end_of_turn_ids)

    def _extend(self, ids, mask=None, logprobs=None):
        ids = list(ids)
        self.traj.token_ids += ids
        self.traj.loss_mask += list(mask) if mask is not None else [0] * len(ids)
        self.traj.behaviour_logprobs += list(logprobs) if logprobs is not None else [0.0] * len(ids)

    def system(self, text: str, tools: list[dict]):
        self._extend(self.chat.render_system(text, tools or None))
        self.traj.messages.append({"role": "system", "content": text})
        self.prev_role = "system"

    def add(self, msg: dict):
        """A message the policy did not sample (user/tool turns, repair prompts, fixed assistant turns)."""
        ids, _ = self.chat.render_message(msg, self.prev_role)
        self._extend(ids)
        self.traj.messages.append(msg)
        self.prev_role = msg["role"]

    def generated(self, result, kind: str, sampling: SamplingParams, engine_kind: str) -> str:
        """Append an engine turn (header, sampled ids, forced closers); return its text.

        The turn record keeps what the learner needs to recompute its behaviour log-probs and to
        mask it: the sampling settings, the engine, the weights' version and how it finished."""
        out = list(result.output_ids)
        self._extend(self.chat.generation_prompt())
        start = len(self.traj.token_ids)
        trained = kind != "repair"
        self._extend(out, [int(trained)] * len(out), list(result.logprobs) if trained else None)
        self.traj.turns.append(turn_record(start, len(self.traj.token_ids), kind, result, sampling, engine_kind))
        ended = bool(out) and out[-1] in self.end_of_turn
        if not ended:  # stopped at </tool_call>, or cut at the length limit
            self._extend([self.im_end])
        self._extend(self.chat.turn_end())
        self.prev_role = "assistant"
        return self.chat.tokenizer.decode(out[:-1] if ended else out)

    def mark_malformed(self):
        """The last turn failed to parse: never a training target (its log-probs stay for a learner
        that pushes it down)."""
        turn = self.traj.turns[-1]
        turn["kind"] = "malformed"
        self.traj.loss_mask[turn["start"]:turn["end"]] = [0] * (turn["end"] - turn["start"])


def derive_seed(*parts) -> int:
    """A 31-bit seed from parts (a run seed, ids, indices): stable across processes and reruns,
    so a resumed or retried episode samples exactly as before."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def turn_seed(episode_seed: int | None, turn: int, attempt: int) -> int | None:
    """The sampling seed of one engine call: fresh noise for every turn and repair attempt of an
    episode, reproducible from the episode's seed (None = let the engine draw one)."""
    if episode_seed is None:
        return None
    return derive_seed(episode_seed, turn, attempt)


def _history_record(style: prompts.PromptStyle, msg, calls: dict) -> dict | None:
    """A tau2 history message as the policy sees it (None: not agent-visible)."""
    from tau2.data_model.message import AssistantMessage, ToolMessage, UserMessage

    if isinstance(msg, UserMessage):
        return None if msg.is_tool_call() else {"role": "user", "content": msg.content}
    if isinstance(msg, ToolMessage):
        return None if msg.requestor != "assistant" else style.tool_result_message(calls[msg.id], msg.id, msg.content)
    if isinstance(msg, AssistantMessage):
        if msg.is_tool_call():
            if len(msg.tool_calls) != 1:
                raise ValueError("message histories with several tool calls in one message are not supported")
            tc = msg.tool_calls[0]
            action = calls[tc.id] = prompts.AgentAction.call(tc.name, tc.arguments)
            call_id = tc.id
        else:
            action, call_id = prompts.AgentAction.say(msg.content), ""
        return {**style.assistant_message(action, style.action_text(action), call_id), "weight": 0}
    raise ValueError(f"unexpected message in a task's history: {type(msg).__name__}")


def _tau2_agent_message(action: prompts.AgentAction, call_id: str):
    from tau2.data_model.message import AssistantMessage, ToolCall

    if action.kind == "stop":
        return AssistantMessage(role="assistant", content="###STOP###")  # what tau2's gym agent sends for `done`
    if action.kind == "message":
        return AssistantMessage(role="assistant", content=action.content)
    call = ToolCall(id=call_id, name=action.name, arguments=action.arguments, requestor="assistant")
    return AssistantMessage(role="assistant", content=action.content or None, tool_calls=[call])


def run_episode(
    task,
    domain: str,
    *,
    engine: Engine,
    user,
    chat,
    style: prompts.PromptStyle | str,
    sampling: SamplingParams,
    max_steps: int = 100,
    max_errors: int = 10,
    max_repairs: int = 1,
    reward_config: rewards.RewardConfig = rewards.RewardConfig(),
    sample_index: int = 0,
) -> Trajectory:
    """Play `task` of `domain` once and score it. See the module docstring for the protocol.

    engine: inference.engine.Engine (called with one prompt per agent turn).
    user: a tau2 BaseUser, fresh or reusable (its state comes from get_init_state).
    chat: data.chat.ChatFormat. style: a PromptStyle or its name ("native" | "recipe").
    sampling: per-turn sampling; the runner adds the `<|im_end|>` / `</tool_call>` stops. Its `seed`
      is the episode's: each engine call gets `turn_seed(seed, turn, attempt)` (fresh noise per
      turn and per repair attempt, the same episode again for the same seed).
    max_repairs: repair prompts allowed per agent turn after unparseable output.
    """
    from tau2.data_model.message import AssistantMessage, MultiToolMessage, UserMessage
    from tau2.data_model.simulation import TerminationReason
    from tau2.user.base import is_valid_user_history_message

    t_start = time.perf_counter()
    timings = defaultdict(float)
    style = prompts.get_style(style) if isinstance(style, str) else style
    spec = tau2_env.domain_spec(domain)
    tok = chat.tokenizer
    stops = {*tok.end_of_turn_ids, tok.tool_call_end_id}
    sampling = dataclasses.replace(
        sampling,
        stop_token_ids=tuple(dict.fromkeys([*sampling.stop_token_ids, *sorted(stops)])),
        stop_strings=tuple(dict.fromkeys([*sampling.stop_strings, *_STOP_STRINGS])),
        affinity=sampling.affinity or f"{domain}/{task.id}/{sample_index}/{sampling.seed}",
    )
    engine_kind = getattr(engine, "kind", type(engine).__name__)
    traj = Trajectory(task_id=task.id, domain=domain, prompt_style=style.name, sample_index=sample_index)
    traj.tools = style.template_tools(spec)
    conv = _Conversation(chat, traj)
    conv.system(style.system_prompt(spec), traj.tools)

    # Initial state, as tau2's Orchestrator.initialize: env state, history, who speaks next.
    env = tau2_env.make_environment(domain)
    init = task.initial_state
    has_history = init is not None and bool(init.message_history)
    history = tau2_env.initial_messages(task)
    env.set_state(
        initialization_data=init.initialization_data if init is not None else None,
        initialization_actions=init.initialization_actions if init is not None else None,
        message_history=history if has_history else [],
    )
    calls: dict = {}  # tool-call id -> AgentAction, for rendering tool results
    for m in history:
        rec = _history_record(style, m, calls)
        if rec is not None:
            conv.add(rec)
    tau2_msgs = list(history)
    message = history[-1]
    if isinstance(message, (AssistantMessage, UserMessage)):
        from_role = _AGENT if isinstance(message, AssistantMessage) else _USER
        to_role = _ENV if message.is_tool_call() else (_USER if from_role == _AGENT else _AGENT)
    else:  # a ToolMessage goes back to whoever made the call
        from_role, to_role = _ENV, (_AGENT if message.requestor == "assistant" else _USER)
    user_history = history[:-1] if to_role == _USER else history
    step, num_errors, done, reason = 0, 0, False, None
    n_calls = 1
    user_state = None

    def agent_turn():
        """Sample until the output parses (at most max_repairs repairs). -> (action, call_id) | None."""
        nonlocal num_errors, n_calls
        turn = sum(t["kind"] != "repair" for t in traj.turns)
        for attempt in range(max_repairs + 1):
            t = time.perf_counter()
            prompt = traj.token_ids + list(chat.generation_prompt())
            params = dataclasses.replace(sampling, seed=turn_seed(sampling.seed, turn, attempt))
            result = _guard("engine", engine.generate, [prompt], params)[0]
            timings["engine"] += time.perf_counter() - t
            if result.finish_reason == "abort":
                raise _InfraError(f"engine: generation aborted ({result.stop_reason})")
            text = conv.generated(result, "policy" if attempt == 0 else "repair", params, engine_kind)
            try:
                action = style.parse(text, chat)
            except prompts.FormatError as e:
                traj.num_format_errors += 1
                num_errors += 1
                if attempt == 0:
                    conv.mark_malformed()
                traj.messages.append({"role": "assistant", "content": text, "malformed": True})
                if attempt < max_repairs:
                    traj.num_repairs += 1
                    conv.add({**style.repair_message(str(e)), "repair": True})
                continue
            call_id = ""
            if action.kind == "tool_call":
                while f"call_{n_calls}" in calls:  # unique, also against a task's history ids
                    n_calls += 1
                call_id = f"call_{n_calls}"
                calls[call_id] = action
            traj.messages.append(style.assistant_message(action, text, call_id))
            return action, call_id
        return None

    try:
        user_state = _guard("user", user.get_init_state, [m for m in user_history if is_valid_user_history_message(m)])
        while not done:
            if to_role == _USER:
                t = time.perf_counter()
                user_msg, user_state = _guard("user", user.generate_next_message, message, user_state)
                _guard("user", user_msg.validate)
                timings["user"] += time.perf_counter() - t
                tau2_msgs.append(user_msg)
                if user.is_stop(user_msg):
                    done, reason = True, TerminationReason.USER_STOP
                elif not user_msg.is_tool_call():
                    conv.add({"role": "user", "content": user_msg.content})
                message, from_role = user_msg, _USER
                to_role = _ENV if user_msg.is_tool_call() else _AGENT
            elif to_role == _AGENT:
                try:
                    turn = agent_turn()
                except ContextLengthError:
                    traj.context_exhausted = True
                    turn = None
                if turn is None:  # still unparseable after the repairs, or out of context
                    done, reason = True, TerminationReason.AGENT_ERROR
                    break
                action, call_id = turn
                message, from_role = _tau2_agent_message(action, call_id), _AGENT
                tau2_msgs.append(message)
                if action.kind == "stop":
                    done, reason = True, TerminationReason.AGENT_STOP
                to_role = _ENV if message.is_tool_call() else _USER
            else:
                t = time.perf_counter()
                tool_msgs = [env.get_response(tc) for tc in message.tool_calls]
                timings["env"] += time.perf_counter() - t
                tau2_msgs.extend(tool_msgs)
                for tm in tool_msgs:
                    num_errors += tm.error
                    if from_role == _AGENT:
                        traj.num_tool_errors += tm.error
                        conv.add(style.tool_result_message(calls[tm.id], tm.id, tm.content))
                message = tool_msgs[0] if len(tool_msgs) == 1 else MultiToolMessage(role="tool", tool_messages=tool_msgs)
                from_role, to_role = _ENV, from_role
            step += 1
            env.sync_tools()
            if to_role == _ENV:
                continue
            # tau2 checks the limits after every step not bound for the environment, even one
            # that just stopped (a stop on exactly the last step counts as MAX_STEPS there too).
            if step >= max_steps:
                done, reason = True, TerminationReason.MAX_STEPS
            if num_errors >= max_errors:
                done, reason = True, TerminationReason.TOO_MANY_ERRORS
        last_to_user = message if to_role == _USER else None
        _guard("user", user.stop, last_to_user, user_state)
        traj.termination_reason = reason.value
        traj.tau2_messages = [m.model_dump(mode="json") for m in tau2_msgs]
        t = time.perf_counter()
        info = _guard("evaluator", rewards.evaluate, task, domain, tau2_msgs, reason.value, time.perf_counter() - t_start)
        timings["evaluate"] += time.perf_counter() - t
    except _InfraError as e:
        traj.infra_error = str(e)
        traj.termination_reason = INFRA_ERROR
        traj.tau2_messages = [m.model_dump(mode="json") for m in tau2_msgs]
    else:
        traj.reward = float(info.reward)
        traj.reward_info = info.model_dump(mode="json")
        audit = rewards.audit_calls(task, tau2_msgs[len(history):], env.tools)  # the task's history is not the policy's
        traj.call_audit = dataclasses.asdict(audit)
        traj.partial_reward = rewards.partial_reward(info, reward_config, domain, audit)
        traj.shaped_reward = rewards.shaped_reward(traj.reward, traj.partial_reward, reward_config, domain)
    traj.num_steps = step
    traj.policy_version = traj.turns[0]["policy_version"] if traj.turns else engine.policy_version
    traj.timings = {k: round(v, 4) for k, v in timings.items()} | {"total": round(time.perf_counter() - t_start, 4)}
    return traj
