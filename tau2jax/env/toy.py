"""A toy tool-use game in its own 16-token vocabulary, small enough for GRPO to learn on CPU.

The game. A task shows a key; a hidden table maps keys to values; the agent must answer the
key's value. It may look the key up first (a tool call; the environment answers with the value):

    TASK K2 END | AGENT K2 END | RESULT V5 END | AGENT V5 END        ("|" = message boundaries)
      prompt     agent: call     tool result     agent: answer

Every agent turn is ONE sampled token, closed by a forced END (mask 0, like the `<|im_end|>`
episode.py forces after a length cut): a key token is a lookup call, a value token an answer, any
other token a malformed action (format error: the episode ends, reward 0). Reward = 1.0 iff the
answer is the task's value; `partial_reward` = 1.0 iff the agent looked up the task's own key;
`shaped_reward` = reward + shaped_alpha·partial (tau2's shape). At most `max_turns` agent turns.

Why these sizes: a randomly initialised model samples nearly uniformly over the vocabulary, so a
k-token action succeeds at random with probability ~(1/V)^k. One-token actions over V = 16 give a
random policy a few percent reward per episode (a blind guess hits 1/16, a lookup keeps the
episode going), so a group of 8 samples often holds a success and GRPO gets a gradient from the
first step. Values are distinct within a table (a wrong lookup returns a wrong value).

Tables. `shared_table=True` (default): one table for every task, so a policy can learn the
answer per key (a 3-context bandit) or look it up. Measured on 2 CPU cores: a random "toy" Qwen3
scores 0.055-0.075 (200 episodes, two inits); a plain REINFORCE loop with group-normalised shaped
rewards (8 tasks x 8 samples a step, Adam 1e-3) lifts it to ~0.5 by step 28 and ~0.8 by step 44
(~0.1 s a step after ~40 s of compilation). `shared_table=False`: a table per task, so the value is only in the tool result and
the agent must call the right key and copy the result: the same loop learns the call (partial
reward) but not the copy in 300 steps; a harder setting, not a CI one.

Train and test tasks come from separate random streams of `seed`; with per-task tables no test
task's table is a train task's table (with a shared table only NUM_KEYS distinct tasks exist).
`gold_record` writes a task's gold episode as SFT data (benchmarks/heldout.py: gold SFT on the
train tables, then GRPO, scored on the test tables).
Trajectories follow episode.py's record exactly (turns with sampling settings, seed
`episode.turn_seed(seed, turn, 0)`, engine kind, finish reason, policy version; loss mask 1 only
on sampled tokens; behaviour log-probs from the engine). Engine failures never raise: they come
back with `infra_error` set.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from dataclasses import dataclass

import numpy as np

from tau2jax.env.environments import TaskRef
from tau2jax.env.episode import turn_seed
from tau2jax.env.rewards import RewardConfig, shaped_reward
from tau2jax.env.trajectory import INFRA_ERROR, Trajectory, turn_record
from tau2jax.inference.engine import ContextLengthError, Engine, SamplingParams

DOMAIN = "toy"
# Control tokens. PAD is never emitted by the environment (free for batch padding).
PAD, TASK, AGENT, RESULT, END = range(5)
NUM_KEYS, NUM_VALUES = 3, 8
KEY0 = 5  # keys: ids 5..7
VALUE0 = KEY0 + NUM_KEYS  # values: ids 8..15
VOCAB_SIZE = VALUE0 + NUM_VALUES  # 16: the "toy" model size's vocab_size
TOKEN_NAMES = ["PAD", "TASK", "AGENT", "RESULT", "END"] + [f"K{i}" for i in range(NUM_KEYS)] + [
    f"V{i}" for i in range(NUM_VALUES)]
# tau2 TerminationReason values, so toy trajectories read like tau2 ones.
AGENT_STOP, MAX_STEPS, AGENT_ERROR = "agent_stop", "max_steps", "agent_error"


@dataclass(frozen=True)
class ToyTask:
    key: int  # 0..NUM_KEYS-1
    table: tuple[int, ...]  # value index of each key, distinct

    @property
    def value(self) -> int:
        return self.table[self.key]

    def prompt_ids(self) -> list[int]:
        return [TASK, KEY0 + self.key, END]


def _draw_tasks(rng: np.random.Generator, n: int, table: tuple[int, ...] | None,
                exclude_tables=frozenset()) -> list[ToyTask]:
    out: list[ToyTask] = []
    for _ in range(100 * n):
        if len(out) == n:
            return out
        t = ToyTask(int(rng.integers(NUM_KEYS)),
                    table or tuple(int(v) for v in rng.permutation(NUM_VALUES)[:NUM_KEYS]))
        if t.table not in exclude_tables:
            out.append(t)
    raise ValueError(f"ToyEnvironment: cannot draw {n} test tasks with tables unlike the train tables; ask for fewer")


def gold_record(ref: TaskRef) -> dict:
    """The gold episode of a toy task (look the key up, copy the value) as an SFT token record
    (`data.sft_data`), laid out exactly as `play_episode` records it: mask 1 on the two actions."""
    task = ref.task
    turns = [([AGENT], 0), ([KEY0 + task.key], 1), ([END, RESULT, VALUE0 + task.value, END, AGENT], 0),
             ([VALUE0 + task.value], 1), ([END], 0)]
    ids, mask = list(task.prompt_ids()), [0] * len(task.prompt_ids())
    for part, trained in turns:
        ids += part
        mask += [trained] * len(part)
    return {"token_ids": ids, "loss_mask": mask, "source": "toy_gold", "task": ref.key}


class ToyEnvironment:
    """The lookup game as an `environments.Environment` (see the module docstring).

    num_tasks: tasks of the chosen split. split: "train" or "test". max_turns: agent turns before
    the episode ends unanswered ("max_steps"). shaped_alpha: weight of the partial reward.
    shared_table: one key -> value table for all tasks (learnable in a CI run) or one per task.
    turn_latency_s: seconds each agent turn waits (models user/tool latency; benchmarks/rl_overlap.py).
    """

    def __init__(self, num_tasks: int = 8, seed: int = 0, *, split: str = "train", max_turns: int = 3,
                 shaped_alpha: float = 0.3, shared_table: bool = True, turn_latency_s: float = 0.0):
        if split not in ("train", "test"):
            raise ValueError(f"ToyEnvironment: split must be 'train' or 'test', got {split!r}")
        if num_tasks < 1 or max_turns < 1:
            raise ValueError(f"ToyEnvironment: num_tasks and max_turns must be >= 1, got {num_tasks}, {max_turns}")
        self.max_turns, self.shaped_alpha, self.turn_latency_s = max_turns, shaped_alpha, turn_latency_s
        table_rng, train_rng, test_rng = (np.random.default_rng([seed, i]) for i in range(3))
        table = tuple(int(v) for v in table_rng.permutation(NUM_VALUES)[:NUM_KEYS]) if shared_table else None
        tasks = _draw_tasks(train_rng, num_tasks, table)
        if split == "test":  # held out from train tables is possible only with per-task tables
            train_tables = frozenset() if shared_table else frozenset(t.table for t in tasks)
            tasks = _draw_tasks(test_rng, num_tasks, table, exclude_tables=train_tables)
            assert not train_tables & {t.table for t in tasks}, "a toy test table is a train table"
        self._tasks = [TaskRef(DOMAIN, f"{split}_{i}", t) for i, t in enumerate(tasks)]

    def tasks(self) -> list[TaskRef]:
        return list(self._tasks)

    def play(self, ref: TaskRef, *, engine: Engine, sampling: SamplingParams, sample_index: int) -> Trajectory:
        return play_episode(ref.task, ref.task_id, engine=engine, sampling=sampling, sample_index=sample_index,
                            max_turns=self.max_turns, shaped_alpha=self.shaped_alpha,
                            turn_latency_s=self.turn_latency_s)


def play_episode(task: ToyTask, task_id: str, *, engine: Engine, sampling: SamplingParams, sample_index: int = 0,
                 max_turns: int = 3, shaped_alpha: float = 0.3, turn_latency_s: float = 0.0) -> Trajectory:
    """One scored episode of `task`. `sampling.seed` is the episode's seed; each turn samples one
    token (max_new_tokens is forced to 1) with seed turn_seed(seed, turn, 0). `turn_latency_s`: a
    sleep after each engine call, standing in for user-simulator / tool latency (no CPU used)."""
    t_start = time.perf_counter()
    sampling = dataclasses.replace(sampling, max_new_tokens=1, stop_token_ids=(END,), stop_strings=())
    engine_kind = getattr(engine, "kind", type(engine).__name__)
    traj = Trajectory(task_id=task_id, domain=DOMAIN, prompt_style="toy", sample_index=sample_index)

    def extend(ids, logprobs=None):
        traj.token_ids += ids
        traj.loss_mask += [int(logprobs is not None)] * len(ids)
        traj.behaviour_logprobs += list(logprobs) if logprobs is not None else [0.0] * len(ids)

    def message(role: str, ids: list[int]):
        names = (TOKEN_NAMES[i] if 0 <= i < VOCAB_SIZE else str(i) for i in ids)  # any engine's vocab
        traj.messages.append({"role": role, "content": " ".join(names)})

    extend(task.prompt_ids())
    message("user", task.prompt_ids()[1:2])
    called_key, answer, engine_s = False, None, 0.0
    reason = MAX_STEPS
    for turn in range(max_turns):
        params = dataclasses.replace(sampling, seed=turn_seed(sampling.seed, turn, 0))
        t = time.perf_counter()
        try:
            result = engine.generate([traj.token_ids + [AGENT]], params)[0]
        except ContextLengthError:
            traj.context_exhausted, reason = True, AGENT_ERROR
            break
        except Exception as e:  # noqa: BLE001  (an engine failure is infrastructure, never the policy's)
            traj.infra_error = f"engine: {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
            break
        finally:
            engine_s += time.perf_counter() - t
        if turn_latency_s:
            time.sleep(turn_latency_s)
        if result.finish_reason == "abort":
            traj.infra_error = f"engine: generation aborted ({result.stop_reason})"
            break
        out = list(result.output_ids)
        extend([AGENT])
        start = len(traj.token_ids)
        extend(out, result.logprobs)
        tok = out[0] if len(out) == 1 else None
        kind = "policy" if tok is not None and KEY0 <= tok < VOCAB_SIZE else "malformed"
        traj.turns.append(turn_record(start, len(traj.token_ids), kind, result, params, engine_kind))
        extend([END])  # forced closer, as episode.py's <|im_end|> after a length cut
        traj.num_steps += 1
        message("assistant", out)
        if kind == "malformed":  # mask 0, log-probs kept (trajectory.py's convention)
            traj.loss_mask[start:start + len(out)] = [0] * len(out)
            traj.messages[-1]["malformed"] = True
            traj.num_format_errors += 1
            reason = AGENT_ERROR
            break
        if tok >= VALUE0:
            answer, reason = tok - VALUE0, AGENT_STOP
            break
        called_key |= tok - KEY0 == task.key
        result_ids = [RESULT, VALUE0 + task.table[tok - KEY0], END]
        extend(result_ids)
        message("tool", result_ids[1:2])
        traj.num_steps += 1
    if traj.infra_error is not None:
        traj.termination_reason = INFRA_ERROR
    else:
        traj.termination_reason = reason
        traj.reward = float(answer == task.value)
        traj.partial_reward = float(called_key)
        traj.shaped_reward = shaped_reward(traj.reward, traj.partial_reward, RewardConfig(alpha=shaped_alpha))
        traj.reward_info = {"reward": traj.reward, "answer": answer, "expected": task.value, "called_key": called_key}
    traj.policy_version = traj.turns[0]["policy_version"] if traj.turns else engine.policy_version
    traj.timings = {"engine": round(engine_s, 4), "total": round(time.perf_counter() - t_start, 4)}
    return traj
