"""The OpenAI request bodies we accept, validated strictly.

Fields OpenAI defines but this server does not implement are accepted only at their neutral
value (``logprobs: null``, ``presence_penalty: 0``...), so a client that sends the defaults keeps
working while a client that relies on the feature gets a clear 400 instead of silently
different output. Fields OpenAI does not define are rejected (``extra="forbid"``).
``ignore_eos`` is vLLM's extension (sent with the ``openai`` client's ``extra_body``).
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr,
                      ValidatorFunctionWrapHandler, field_validator)

MAX_N = 16
MAX_STOP = 4
# OpenAI's seed is a signed 64-bit integer; larger values cannot reach a generator.
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 63) - 1
# No context is this long; the bound keeps every later message about max_tokens a small number
# (Python refuses to print an int of more than 4300 digits).
MAX_TOKENS = (1 << 31) - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: StrictBool = False


Number = Union[StrictInt, float]  # JSON numbers; strict mode rejects "0.5" strings and bools
# A completion's prompt: a string, a list of strings, token ids, or lists of ids.
Prompt = Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]


class _Sampling(_Strict):
    """Fields shared by both endpoints."""

    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: Number = Field(default=1.0, ge=0.0, le=2.0)
    top_p: Number = Field(default=1.0, gt=0.0, le=1.0)
    n: StrictInt = Field(default=1, ge=1, le=MAX_N)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    ignore_eos: StrictBool = False
    # OpenAI fields accepted only at their neutral value (see module docstring).
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    logit_bias: dict[str, Any] | None = None

    @field_validator("temperature", "top_p", "presence_penalty", "frequency_penalty", mode="before")
    @classmethod
    def _no_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("expected a number, got a boolean")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: Any) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, why) for neutral-only fields set to something else."""
        out = []
        if self.presence_penalty != 0:
            out.append(("presence_penalty", "presence_penalty is not supported; expected 0"))
        if self.frequency_penalty != 0:
            out.append(("frequency_penalty", "frequency_penalty is not supported; expected 0"))
        if self.logit_bias:
            out.append(("logit_bias", "logit_bias is not supported; expected null or {}"))
        return out


class CompletionRequest(_Sampling):
    """``POST /v1/completions``. ``prompt``: a string, a list of strings, token ids, or lists of ids."""

    prompt: Prompt
    max_tokens: StrictInt | None = Field(default=16, ge=1, le=MAX_TOKENS)  # OpenAI's default
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _token_ids_fast(cls, v: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """A list of plain ints is ``list[StrictInt]`` as it stands. ``Prompt`` would first try
        it as ``list[StrictStr]``, an error per id: on 1 024 ids, 8x the time of the ints
        alone (bench/request_parse.py)."""
        if type(v) is list and all(type(x) is int for x in v):
            return v
        return handler(v)

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.echo:
            out.append(("echo", "echo is not supported; expected false"))
        if self.logprobs is not None:
            out.append(("logprobs", "logprobs is not supported; expected null"))
        if self.best_of not in (None, 1):
            out.append(("best_of", "best_of is not supported; expected null or 1"))
        if self.suffix:
            out.append(("suffix", "suffix is not supported; expected null"))
        return out


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``; the prompt is the tokenizer's chat template over ``messages``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1, le=MAX_TOKENS)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.logprobs or self.top_logprobs:
            out.append(("logprobs", "logprobs is not supported; expected false"))
        if self.response_format and self.response_format.get("type") != "text":
            out.append(("response_format", "only response_format {\"type\": \"text\"} is "
                        "supported"))
        if self.tools or self.tool_choice not in (None, "none"):
            out.append(("tools", "tool calling is not supported; expected no tools"))
        return out

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens
