"""The OpenAI wire format: request schemas (checked strictly), response bodies, errors, chat template.

Requests are pydantic models with `extra="forbid"` and strict types: an unknown field, a string
where a number belongs or a NaN is a 400 with an OpenAI-style error naming the parameter, never
a crash and never a silent default. Parameters OpenAI defines but this server cannot honour
(n > 1, logprobs, logit_bias, presence/frequency penalties, suffix, best_of > 1) are refused
the same way rather than ignored.

Sampling extensions beyond OpenAI's set, as llama.cpp's and vLLM's servers name them: `top_k`,
`repetition_penalty`, `ignore_eos`. Parameters left out take the model folder's
generation_config.json values (the exporter writes temperature 0.8, top-k 40, top-p 0.95).

Chat template (these are base models, trained on plain books; a transcript is what they can
continue):

    {system or developer message}\\n\\n        (each, if any)
    User: {content}\\n
    Assistant: {content}\\n
    ...
    Assistant:

Generation stops at "\\nUser:" (added to the request's stop strings) so the model does not write
the user's next turn; the reply is stripped of leading spaces.
"""

from __future__ import annotations

import secrets
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

CHAT_STOP = "\nUser:"
MAX_STOPS = 4  # as OpenAI
ROLES = {"user": "User", "assistant": "Assistant"}


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------- requests
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """What both endpoints share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v):
        if v:
            raise ValueError("not supported by this server (use repetition_penalty)")
        return v

    @field_validator("n")
    @classmethod
    def _one(cls, v):
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("not supported by this server")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        if any(len(s) > 256 for s in stops):
            raise ValueError("a stop string may be at most 256 characters")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("one prompt per request is supported (got a list of several)")
            v = v[0]
        if len(v) == 0:
            raise ValueError("the prompt is empty")
        return v

    @field_validator("logprobs", "suffix")
    @classmethod
    def _unsupported(cls, v):
        if v is not None:
            raise ValueError("not supported by this server")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v):
        if v not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return v


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v:
            raise ValueError("not supported by this server")
        return v


def parse(schema: type[_Strict], body: bytes) -> _Strict:
    """Validate a JSON body against a request schema; any problem becomes a 400 APIError."""
    try:
        return schema.model_validate_json(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = [str(p) for p in err["loc"]]
        param = loc[0] if loc else None
        kind = err["type"]
        if kind == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON ({err['msg']})") from None
        if kind == "model_type" and not loc:
            raise APIError(400, "the request body must be a JSON object") from None
        if kind == "extra_forbidden":
            raise APIError(400, f"Unrecognized request argument supplied: {'.'.join(loc)}",
                           param=param) from None
        if kind == "missing":
            raise APIError(400, f"Missing required parameter: '{'.'.join(loc)}'", param=param) from None
        msg = err["msg"].removeprefix("Value error, ")
        raise APIError(400, f"Invalid value for '{param}': {msg}", param=param) from None


def chat_prompt(messages: list[Message]) -> str:
    """The documented transcript template (module docstring), ending in "Assistant:"."""
    parts = []
    for m in messages:
        if m.role in ("system", "developer"):
            parts.append(f"{m.text()}\n\n")
        else:
            parts.append(f"{ROLES[m.role]}: {m.text()}\n")
    return "".join(parts) + "Assistant:"


# ----------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, created: int, text: str, finish: str | None,
               use: dict | None = None, chunk: bool = False) -> dict:
    """A text_completion body (a whole answer, or one streamed chunk)."""
    out = {"id": rid, "object": "text_completion", "created": created, "model": model,
           "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
    if not chunk or use is not None:
        out["usage"] = use
    return out


def chat(rid: str, model: str, created: int, text: str, finish: str, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish}],
            "usage": use}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, use: dict) -> dict:
    """The last chunk when stream_options.include_usage: no choices, the usage counts."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "perseus-edge"}


def timestamp() -> int:
    return int(time.time())
