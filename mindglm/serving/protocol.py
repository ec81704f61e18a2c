"""OpenAI request bodies and errors, as vLLM's OpenAI-compatible server takes and returns them.

Only what the engine can honour is accepted: a field the server cannot do (n > 1, logprobs,
frequency/presence penalties) is a 400 naming it, never silently ignored. Unknown extra fields
are tolerated, as vLLM does, so that clients sending newer OpenAI fields keep working.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# vLLM's error `type` per status (ErrorResponse in vllm/entrypoints/openai/protocol.py).
ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               429: "RateLimitError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


class APIError(Exception):
    """An error the client sees as `{"error": {message, type, param, code}}` with `status`."""

    def __init__(self, status: int, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "APIError"),
                          "param": self.param, "code": self.status}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False


class FunctionDefinition(_Body):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict] = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ToolCallFunction(_Body):
    name: str
    arguments: str = "{}"


class ToolCall(_Body):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    # "observation" is ChatGLM3's own name for OpenAI's "tool" role; both are accepted.
    role: Literal["system", "user", "assistant", "tool", "observation"]
    content: Union[str, list[TextPart], None] = None
    tool_calls: Optional[list[ToolCall]] = None
    name: Optional[str] = None
    tool_call_id: Optional[str] = None

    def text(self) -> str:
        """The message's text (text parts joined, as OpenAI's content arrays allow)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class SamplingRequest(_Body):
    """The fields /v1/chat/completions and /v1/completions share."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1
    user: Optional[str] = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: Union[bool, int, None] = None
    # vLLM's extra sampling parameters
    top_k: Optional[int] = Field(None, ge=-1)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False  # run to max_tokens (benchmarks with fixed output lengths)

    def check_supported(self) -> None:
        """A 400 for a field this server cannot honour."""
        if self.n != 1:
            raise APIError(400, "only n=1 is supported", "n")
        if self.frequency_penalty or self.presence_penalty:
            raise APIError(400, "frequency_penalty and presence_penalty are not supported; use "
                                "repetition_penalty", "frequency_penalty" if self.frequency_penalty
                           else "presence_penalty")
        if self.logprobs:
            raise APIError(400, "logprobs are not supported", "logprobs")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
        if any(not s for s in self.stop_strings()):
            raise APIError(400, "stop strings must not be empty", "stop")

    def stop_strings(self) -> list:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def budget(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], dict, None] = None


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[str], list[int]]
    echo: bool = False
    suffix: Optional[str] = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise APIError(400, "echo is not supported", "echo")
        if self.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if isinstance(self.prompt, list):
            if not self.prompt:
                raise APIError(400, "prompt must not be empty", "prompt")
            if isinstance(self.prompt[0], str) and len(self.prompt) != 1:
                raise APIError(400, "one prompt per request is supported (got a list of "
                                    f"{len(self.prompt)})", "prompt")


def parse_body(model_class, body) -> SamplingRequest:
    """Validate a decoded JSON body; a wrong field is one 400 naming it."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        request = model_class.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise APIError(400, f"{where}: {first['msg']}" if where else first["msg"],
                       str(first["loc"][0]) if first["loc"] else None) from None
    request.check_supported()
    return request
