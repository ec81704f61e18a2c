"""OpenAI requests -> what the engine takes: prompt ids, a GenerationConfig and stop ids.

Chat messages become a family turn with `mindglm.chat.messages_to_turn`, and the prompt is the
one `model.chat()` builds (`build_chat_ids`), so a greedy reply over HTTP is `chat()`'s reply.
The OpenAI names map onto ChatGLM's as THUDM's own openai_api demos map them:
- role "tool" is ChatGLM3's "observation" (a tool's result fed back);
- an assistant message with `tool_calls` is ChatGLM3's assistant turn with the tool name as
  metadata and the call as content;
- `tools` become the `tools` of ChatGLM3's opening system message (`chat.system_messages`);
- ChatGLM-6B/ChatGLM2-6B have no system role: a leading system message is put before the
  query, as THUDM's ChatGLM2 openai_api.py does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from mindglm import chat
from mindglm.generation.config import GenerationConfig
from mindglm.serving.protocol import APIError, ChatCompletionRequest, CompletionRequest, SamplingRequest


@dataclass
class Prompt:
    """What one request puts into the engine, plus what its Reply needs."""

    ids: list
    history: list        # the conversation before the query (ChatGLM3 tool parsing reads it)
    stop_ids: list
    tool_call_ids: list
    has_tools: bool = False


def _tool_call_content(call) -> str:
    """A tool call in the form ChatGLM3 writes it: ```python\\ntool_call(a=1)\\n```."""
    try:
        arguments = json.loads(call.function.arguments or "{}")
    except ValueError:
        raise APIError(400, f"tool call {call.function.name!r}: arguments are not JSON", "messages") from None
    if not isinstance(arguments, dict):
        raise APIError(400, f"tool call {call.function.name!r}: arguments must be a JSON object", "messages")
    keywords = ", ".join(f"{key}={value!r}" for key, value in arguments.items())
    return f"```python\ntool_call({keywords})\n```"


def _v3_messages(request: ChatCompletionRequest) -> list:
    messages = []
    for message in request.messages:
        role = "observation" if message.role == "tool" else message.role
        if role == "assistant" and message.tool_calls:
            messages += [{"role": "assistant", "metadata": call.function.name, "content": _tool_call_content(call)}
                         for call in message.tool_calls]
            continue
        messages.append({"role": role, "content": message.text()})
    tools = [tool.function.model_dump(exclude_none=True) for tool in request.tools or []]
    if tools and request.tool_choice != "none":
        system_text = None
        if messages and messages[0]["role"] == "system":
            system_text = messages.pop(0)["content"]
        messages = chat.system_messages(system_text, tools) + messages
    return messages


def _v1_v2_messages(request: ChatCompletionRequest, family: str) -> tuple:
    if request.tools:
        raise APIError(400, f"tools need a ChatGLM3 model; this one is {family}", "tools")
    messages = [{"role": m.role, "content": m.text()} for m in request.messages]
    system = ""
    if messages and messages[0]["role"] == "system":
        system = messages.pop(0)["content"]
    for index, message in enumerate(messages):
        if message["role"] not in ("user", "assistant"):
            raise APIError(400, f"messages[{index}]: role {message['role']!r} needs a ChatGLM3 model; "
                                f"{family} takes user and assistant turns (and one leading system message)",
                           "messages")
    return messages, system


def chat_prompt(request: ChatCompletionRequest, tokenizer, family: str) -> Prompt:
    """The prompt of a chat request, built by the family's template."""
    if family == "chatglm3":
        messages, system = _v3_messages(request), ""
    else:
        messages, system = _v1_v2_messages(request, family)
    try:
        query, history, role = chat.messages_to_turn(messages, family)
        ids = chat.build_chat_ids(tokenizer, family, system + query, history, role)
    except ValueError as exc:  # ChatError included: the message says what is wrong
        raise APIError(400, str(exc), "messages") from None
    stop_ids = chat.stop_token_ids(tokenizer, family)
    tool_call_ids = [tokenizer.role_token_id("observation")] if family == "chatglm3" and not request.ignore_eos else []
    has_tools = bool(history) and history[0].get("role") == "system" and "tools" in history[0] \
        if family == "chatglm3" else False
    return Prompt(ids, history, _with_extra_stops(stop_ids, request), tool_call_ids, has_tools)


def completion_prompt(request: CompletionRequest, tokenizer, family: str) -> Prompt:
    """The prompt of a raw completion: the text tokenized with the family's special tokens (or
    the token ids given), no chat template."""
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "prompt must not be empty", "prompt")
        ids = tokenizer.encode(prompt, add_special_tokens=True)
    else:
        vocab = tokenizer.vocab_size
        if any(i < 0 or i >= vocab for i in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
        ids = list(prompt)
    return Prompt(ids, [], _with_extra_stops([tokenizer.eos_token_id], request), [])


def _with_extra_stops(stop_ids: list, request: SamplingRequest) -> list:
    if request.ignore_eos:
        return list(request.stop_token_ids or [])
    extra = [i for i in request.stop_token_ids or [] if i not in stop_ids]
    return list(stop_ids) + extra


def generation_config(request: SamplingRequest, defaults: GenerationConfig) -> GenerationConfig:
    """The request's sampling settings over the run's generation defaults.

    temperature 0 is greedy (as in OpenAI's API); a field left out keeps the run's default, so a
    request with no settings samples like `run_chat.py` does with the same config. max_tokens
    counts new tokens; without it the run's max_length / max_new_tokens apply, and without those
    the reply may use the rest of the context.
    """
    settings: dict = {"eos_token_id": None, "pad_token_id": None}
    budget = request.budget()
    if budget is not None:
        settings.update(max_new_tokens=budget, max_length=None)
    if request.temperature is not None:
        if request.temperature == 0:
            settings["do_sample"] = False
        else:
            settings.update(do_sample=True, temperature=float(request.temperature))
    if request.top_p is not None:
        settings["top_p"] = float(request.top_p)
    if request.top_k is not None:
        settings["top_k"] = max(request.top_k, 0)  # vLLM's -1 and 0 both mean "no top-k"
    if request.repetition_penalty is not None:
        settings["repetition_penalty"] = float(request.repetition_penalty)
    if request.seed is not None:
        settings["seed"] = request.seed
    return GenerationConfig.from_kwargs(defaults, **settings)


def requested_model(request: SamplingRequest, served: str) -> Optional[str]:
    """404 unless the request names the served model (or none, as vLLM allows)."""
    if request.model is not None and request.model != served:
        raise APIError(404, f"The model `{request.model}` does not exist.", "model")
    return served
