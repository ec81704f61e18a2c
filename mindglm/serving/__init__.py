"""The HTTP API over the engine (OpenAI-compatible, as vLLM serves it) and the web chat page.

    from mindglm.serving import ServerState, create_app, serve
    state = ServerState(model, tokenizer, model_name="chatglm3-6b")
    serve(state, host="127.0.0.1", port=8000)       # what tools/serve.py runs

Modules: protocol (request bodies, errors), prompts (request -> prompt ids + GenerationConfig),
replies (ids -> deltas, stop strings, tool calls), requests (one request's life), engine_loop
(the engine's thread), metrics (Prometheus), app (the endpoints), server (uvicorn + drain),
cli (the command line); static/ holds the chat page.
"""
from mindglm.serving.app import ServerState, create_app
from mindglm.serving.server import serve

__all__ = ["ServerState", "create_app", "serve"]
