"""OpenAI-compatible request bodies (pydantic v2) for /v1/completions and /v1/chat/completions.

Unknown fields are ignored, as OpenAI's API does; every known field is type- and range-checked
here so a bad value becomes a 400 naming the field (see `errors.py`), never a 500 later. Ranges
follow vLLM's `SamplingParams._verify_args` (temperature >= 0, top_p in (0, 1], penalties in
[-2, 2], n >= 1) plus caps that keep one request from asking for unbounded work.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

INT64_MAX = 2**63 - 1
MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_STOP = 16
MAX_STOP_LEN = 256

TokenIds = list[Annotated[StrictInt, Field(ge=-(2**31), le=2**31)]]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class SamplingFields(BaseModel):
    """Fields shared by both endpoints (OpenAI's plus vLLM's extensions)."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1, le=INT64_MAX)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=100.0, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] = 1.0
    top_k: Annotated[StrictInt, Field(ge=-1, le=1 << 20)] = 0
    seed: Annotated[StrictInt, Field(ge=-(2**63), le=INT64_MAX)] | None = None
    stop: StrictStr | Annotated[list[Annotated[StrictStr, Field(max_length=MAX_STOP_LEN)]],
                                Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: Annotated[TokenIds, Field(max_length=MAX_STOP)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)] = 0.0
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    priority: Annotated[StrictInt, Field(ge=-(2**31), le=2**31)] = 0
    return_routed_experts: StrictBool = False
    return_token_ids: StrictBool = False
    response_format: ResponseFormat | None = None
    user: StrictStr | None = None

    @field_validator("stop")
    @classmethod
    def _stop_len(cls, v):
        if isinstance(v, str) and len(v) > MAX_STOP_LEN:
            raise ValueError(f"a stop string may have at most {MAX_STOP_LEN} characters")
        if isinstance(v, list) and any(s == "" for s in v) or v == "":
            raise ValueError("stop strings must be non-empty")
        return v

    def stop_list(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingFields):
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    suffix: StrictStr | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | Annotated[list[TextPart], Field(min_length=1)] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1, le=INT64_MAX)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    add_generation_prompt: StrictBool = True
    echo: StrictBool = False


AnyRequest = Union[CompletionRequest, ChatCompletionRequest]
