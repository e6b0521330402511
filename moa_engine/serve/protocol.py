"""The OpenAI request bodies `moa serve` takes, and its error shape.

The fields and their defaults are OpenAI's (as vLLM and LoRAX take them); `top_k`, `routing`
and `ignore_eos` are extra sampling fields, as vLLM takes its own. Unknown fields are ignored,
as OpenAI-compatible servers do, so clients that send newer fields still work.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from moa_engine.routing import STRATEGIES

MAX_N = 16  # choices per request: each is a sequence in the batch


class APIError(Exception):
    """An error answered as OpenAI's JSON: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        429: "rate_limit_error",
        500: "server_error",
        503: "service_unavailable",
    }

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """The fields completions and chat share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    user: str | None = None
    routing: Literal["per_layer", "last", "vote"] | None = Field(None, description=f"one of {STRATEGIES}")
    ignore_eos: bool = False

    # Fields whose meaning the server does not provide: refused, rather than ignored, so that a
    # client never reads a default (no logprobs, no tool call) as an answer.
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    response_format: dict | None = None

    @field_validator("logprobs", "top_logprobs", "tools")
    @classmethod
    def _unsupported(cls, v, info):
        if v not in (None, False, 0, []):
            raise ValueError(f"{info.field_name} is not supported by this server")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v):
        if v is not None and v.get("type", "text") != "text":
            raise ValueError(f"response_format type {v.get('type')!r} is not supported (only 'text')")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if len(stops) > 8:
            raise ValueError(f"at most 8 stop strings, got {len(stops)}")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("echo", "suffix")
    @classmethod
    def _unsupported_completion(cls, v, info):
        if v:
            raise ValueError(f"{info.field_name} is not supported by this server")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v):
        if v not in (None, 1):
            raise ValueError("best_of other than 1 is not supported by this server; use n")
        return v

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, v):
        if isinstance(v, str) and not v:
            raise ValueError("prompt is empty")
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt is an empty list")
            if any((isinstance(p, (str, list)) and not p) for p in v):
                raise ValueError("prompt holds an empty prompt")
        return v

    def prompts(self) -> list:
        """One prompt per entry: strings, or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(t, int) for t in p):
            return [list(p)]
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        """The content as text: a string, or the text parts of a content list."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported, got {part.get('type')!r}")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def message_dicts(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class LoadAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """pydantic's errors as one message and the offending field (OpenAI's `param`)."""
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('msg')}", None
    if first.get("type") in ("model_attributes_type", "dict_type") and not loc:
        return "the body must be a JSON object (send it with Content-Type: application/json)", None
    if first.get("type") == "missing":
        if not loc:
            return "the body is empty: expected a JSON object", None
        return f"'{param}' is required", param
    msg = first.get("msg", "invalid value")
    if "input" in first and not isinstance(first["input"], (dict, list)):
        msg += f", got {first['input']!r}"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return (f"'{param}': {msg}" if param else msg) + more, param
