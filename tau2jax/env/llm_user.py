"""tau2's own LLM user simulator, speaking to any OpenAI-compatible endpoint through litellm.

`LLMUser` is `tau2.user.user_simulator.UserSimulator` (its global guidelines, scenario prompt,
`###STOP###` / `###TRANSFER###` / `###OUT-OF-SCOPE###` signals and user-tool handling are
unchanged) with one addition: each turn is retried with exponential backoff, and a turn that still
fails raises `UserSimulatorError`, which the episode runner records as an infrastructure failure
(not a model failure).

Every sampling parameter goes with each request (temperature, top_p, top_k, min_p, the presence /
frequency / repetition penalties, max_tokens), so the user behaves the same whatever the server's
defaults: SGLang 0.5.2x (`--sampling-defaults model`) takes an omitted one from the model's
generation_config.json, 0.5.3 uses neutral ones, and a request without max_tokens runs to the
context limit. top_k, min_p and repetition_penalty are SGLang's, outside OpenAI's API: they go in
`extra_body` (the OpenAI client merges it into the JSON body); `sglang_params=False` leaves them out
for an endpoint that rejects unknown fields (api.openai.com).

Retries are ours alone: tau2's `generate` forwards `llm_args` to `litellm.completion`, where
`num_retries=0` turns off litellm's retry wrapper and `max_retries=0` the OpenAI client's, so one
attempt is one HTTP request bounded by `timeout`.

    user_for = stages.builders.user_factory(config)   # user_for(task, domain): an LLMUser per episode,
                                                      # on one of config.user.base_url's servers
"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm downloads prices at import otherwise

import litellm  # noqa: E402
import tenacity  # noqa: E402
from tau2.user.user_simulator import UserSimulator  # noqa: E402


class UserSimulatorError(RuntimeError):
    """The user simulator's LLM could not produce a turn (after retries): an infrastructure failure."""


class EmptyUserResponse(RuntimeError):
    """The endpoint answered with neither text nor tool calls (tau2 would crash on it later)."""


# Client-side mistakes that a retry cannot fix: fail the turn at once.
_NOT_RETRYABLE = (
    litellm.BadRequestError,  # includes ContextWindowExceededError
    litellm.AuthenticationError,
    litellm.PermissionDeniedError,
    litellm.NotFoundError,
)


class LLMUser(UserSimulator):
    def __init__(
        self,
        tools,
        instructions,
        *,
        model: str,
        base_url: str,
        api_key: str = "EMPTY",
        temperature: float = 0.7,
        top_p: float = 1.0,
        top_k: int = -1,
        min_p: float = 0.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        max_tokens: int = 1024,
        sglang_params: bool = True,
        timeout_s: float = 120.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
    ):
        # The endpoint is OpenAI-compatible by contract; litellm needs the provider prefix to know it.
        model = model if "/" in model else f"openai/{model}"
        llm_args = {
            "api_base": base_url or None,
            "api_key": api_key,
            # every sampling parameter pinned (none left to the server's defaults: module doc)
            "temperature": temperature,
            "top_p": top_p,
            "presence_penalty": presence_penalty,
            "frequency_penalty": frequency_penalty,
            "max_tokens": max_tokens,
            "timeout": timeout_s,
            "num_retries": 0,
            "max_retries": 0,
        }
        if sglang_params:  # outside OpenAI's API: the OpenAI client sends extra_body's keys in the JSON body
            llm_args["extra_body"] = {"top_k": top_k, "min_p": min_p, "repetition_penalty": repetition_penalty}
        super().__init__(tools=tools, instructions=instructions, llm=model, llm_args=llm_args)
        self.base_url = base_url
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s

    def generate_next_message(self, message, state):
        # UserSimulator appends to state.messages before calling the LLM; undo that before each
        # retry so a failed attempt leaves no trace in the conversation.
        n = len(state.messages)

        def attempt():
            del state.messages[n:]
            user_msg, new_state = self._generate_next_message(message, state)
            if not (user_msg.content and user_msg.content.strip()) and not user_msg.tool_calls:
                raise EmptyUserResponse("empty response (no content, no tool calls)")
            return user_msg, new_state

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.max_retries + 1),
            wait=tenacity.wait_exponential(multiplier=self.backoff_s, max=self.max_backoff_s),
            retry=tenacity.retry_if_not_exception_type(_NOT_RETRYABLE),
            reraise=True,
        )
        try:
            return retrying(attempt)
        except Exception as e:
            del state.messages[n:]
            tries = retrying.statistics.get("attempt_number", 1)
            raise UserSimulatorError(
                f"user simulator {self.llm} at {self.base_url} failed after {tries} attempt(s): "
                f"{type(e).__name__}: {e}"
            ) from e
