"""The FastAPI application: OpenAI-compatible endpoints, health, metrics and the chat page.

    state = ServerState(model, tokenizer, model_name="chatglm3-6b")
    app = create_app(state)          # uvicorn runs it; state.loop steps the engine in its thread
"""
from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from mindglm.serving.engine_loop import EngineLoop
from mindglm.serving.metrics import ServerMetrics
from mindglm.serving.prompts import (chat_prompt, completion_prompt, generation_config, requested_model)
from mindglm.serving.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_body
from mindglm.serving.replies import Reply
from mindglm.serving.requests import Generation

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


class ServerState:
    """Everything the endpoints share: the model, the engine thread, metrics, drain state."""

    def __init__(self, model, tokenizer, model_name: str, api_key: Optional[str] = None, warmup: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.family = model.config.family
        self.model_name = model_name
        self.api_key = api_key
        self.defaults = model.generation_config
        self.loop = EngineLoop(model.engine, warmup=warmup)
        self.metrics = ServerMetrics(self.loop, model_name)
        self.created = int(time.time())
        self.active = 0          # requests between acceptance and their last byte
        self.draining = False

    def quiet(self) -> bool:
        """Nothing is being served any more (drain can end)."""
        return self.active == 0 and self.loop.idle()

    def check_serving(self) -> None:
        """503 while the engine warms up, after a failed warm-up, or while draining."""
        if self.draining:
            raise APIError(503, "the server is shutting down")
        if self.loop.error is not None:
            raise APIError(503, self.loop.error.splitlines()[0])
        if not self.loop.ready.is_set():
            raise APIError(503, "the model is warming up; retry in a moment")

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided" if header else
                           "Missing API key: send 'Authorization: Bearer <key>'")

    @property
    def max_model_len(self) -> Optional[int]:
        return self.loop.stats.get("max_model_len")


def _error_response(error: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def _json_body(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"malformed JSON in the request body: {exc}") from None


async def _until_disconnect(request: Request) -> None:
    # after the body is read, the next ASGI message can only be the client going away
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, generation: Generation):
    """The Final of a non-streaming reply; if the client leaves first, its sequence is aborted."""
    work = asyncio.ensure_future(generation.run_to_end())
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if work.done():
        return work.result()
    work.cancel()
    generation.release()
    return None


def _sse(payload) -> dict:
    return {"data": payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}


class _Endpoint:
    """What differs between chat and text completions: request class, prompt, response shapes."""

    def __init__(self, state: ServerState, chat: bool):
        self.state, self.chat = state, chat
        self.request_class = ChatCompletionRequest if chat else CompletionRequest
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.prefix = "chatcmpl" if chat else "cmpl"

    def prepare(self, request) -> Generation:
        state = self.state
        requested_model(request, state.model_name)
        build = chat_prompt if self.chat else completion_prompt
        prompt = build(request, state.tokenizer, state.family)
        try:
            config = generation_config(request, state.defaults)
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        reply = Reply(state.tokenizer, state.family, self.chat, prompt.history, request.stop_strings(),
                      prompt.stop_ids)
        return Generation(state, prompt, config, reply, self.prefix, "messages" if self.chat else "prompt")

    # ------------------------------------------------------------------ response shapes
    def _head(self, generation: Generation, object_name: str, created: int) -> dict:
        return {"id": generation.request_id, "object": object_name, "created": created,
                "model": self.state.model_name}

    def response(self, generation: Generation, final, created: int) -> dict:
        if self.chat:
            message = {"role": "assistant", "content": final.text}
            if final.tool_calls:
                message["tool_calls"] = final.tool_calls
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": final.finish_reason}
        else:
            choice = {"index": 0, "text": final.text, "logprobs": None, "finish_reason": final.finish_reason}
        return {**self._head(generation, self.object, created), "choices": [choice], "usage": generation.usage()}

    def chunk(self, generation: Generation, created: int, delta: Optional[dict] = None, text: str = "",
              finish_reason: Optional[str] = None) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head(generation, self.chunk_object, created), "choices": [choice]}

    async def stream(self, generation: Generation, include_usage: bool, created: int):
        """SSE events: (chat) a role delta, content deltas, the finish chunk, usage, [DONE]."""
        try:
            if self.chat:
                yield _sse(self.chunk(generation, created, {"role": "assistant", "content": ""}))
            async for event in generation.events():
                final = event.final
                if final is None:
                    yield _sse(self._content_chunk(generation, created, event.delta))
                    continue
                if event.delta:
                    yield _sse(self._content_chunk(generation, created, event.delta))
                if final.tool_calls:
                    calls = [{"index": i, **call} for i, call in enumerate(final.tool_calls)]
                    yield _sse(self.chunk(generation, created, {"tool_calls": calls}))
                yield _sse(self.chunk(generation, created, finish_reason=final.finish_reason))
                if include_usage:
                    yield _sse({**self._head(generation, self.chunk_object, created), "choices": [],
                                "usage": generation.usage()})
        except APIError as error:  # after the stream started the status is sent: the error goes in it
            yield _sse(error.body())
        finally:
            generation.release()
        yield _sse("[DONE]")

    def _content_chunk(self, generation, created, delta: str) -> dict:
        if self.chat:
            return self.chunk(generation, created, {"content": delta})
        return self.chunk(generation, created, text=delta)

    async def __call__(self, request: Request):
        state = self.state
        state.check_key(request)
        state.check_serving()
        body = parse_body(self.request_class, await _json_body(request))
        generation = self.prepare(body)
        await generation.start()
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventSourceResponse(self.stream(generation, include_usage, created), ping=15,
                                       background=BackgroundTask(generation.release))
        final = await _unless_disconnected(request, generation)
        if final is None:
            return Response(status_code=499)  # nobody is listening; the row is already freed
        return JSONResponse(self.response(generation, final, created))


def create_app(state: ServerState) -> FastAPI:
    """The ASGI app over `state` (whose engine loop the caller starts)."""
    app = FastAPI(title="mindglm", docs_url=None, redoc_url=None)
    app.state.server = state

    @app.exception_handler(APIError)
    async def api_error(_request, error: APIError):
        return _error_response(error)

    chat, completions = _Endpoint(state, chat=True), _Endpoint(state, chat=False)
    app.add_api_route("/v1/chat/completions", chat, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])

    @app.get("/v1/models")
    async def models(request: Request):
        state.check_key(request)
        card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "mindglm",
                "root": state.model_name, "parent": None, "max_model_len": state.max_model_len}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        try:
            state.check_serving()
        except APIError as error:
            return _error_response(error)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        with open(os.path.join(STATIC, "index.html"), encoding="utf-8") as handle:
            html = handle.read()
        settings = {"model": state.model_name, "family": state.family, "auth": state.api_key is not None,
                    "defaults": {"temperature": state.defaults.temperature if state.defaults.do_sample else 0,
                                 "top_p": state.defaults.top_p, "top_k": state.defaults.top_k,
                                 "repetition_penalty": state.defaults.repetition_penalty}}
        # </ cannot close the script element from inside JSON text
        return html.replace("__MINDGLM_SETTINGS__", json.dumps(settings).replace("</", "<\\/"))

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app

