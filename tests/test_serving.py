"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official `openai` client and raw
HTTP, on the tiny e2e models: replies equal `model.chat()`, concurrency, errors, disconnects, drain."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time

import httpx
import openai
import pytest

from conftest import FIXTURES, reference_chat
from live_server import FEW_BUCKETS, GUARDED_KEY, TINY_CONFIGS, LiveServer

FAMILIES = ("chatglm", "chatglm2", "chatglm3")
API_KEY = GUARDED_KEY


def golden_cases(family):
    with open(os.path.join(FIXTURES, "chat", f"{family}-e2e", "chat_golden.json"), encoding="utf-8") as fh:
        return json.load(fh)


def to_messages(query, history, family):
    """The chat() arguments as OpenAI messages."""
    messages = []
    for turn in history:
        if family == "chatglm3":
            assert not turn.get("metadata")
            messages.append({"role": turn["role"], "content": turn["content"]})
        else:
            messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    return messages + [{"role": "user", "content": query}]


@pytest.fixture(scope="module")
def servers(live_servers):
    """One server per family, plus one chatglm2 server with an API key, one row and a queue of one."""
    return live_servers.get(*FAMILIES, "guarded")


def client(server, key="unused"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def model_id(server):
    return httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]


# ---------------------------------------------------------------------------------- replies
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_replies_equal_model_chat(servers, family):
    server = servers[family]
    model, tokenizer, settings, _ = reference_chat(TINY_CONFIGS[family])
    api = client(server)
    name = model_id(server)
    assert name == f"{family}-e2e"  # the checkpoint dir's base name
    for case in golden_cases(family):
        expected, _ = model.chat(tokenizer, case["query"], case["history"], **settings)
        messages = to_messages(case["query"], case["history"], family)
        reply = api.chat.completions.create(model=name, messages=messages, temperature=0)
        assert reply.choices[0].message.content == expected == case["response"]
        assert reply.id.startswith("chatcmpl-") and reply.model == name and reply.created > 0
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        chunks = list(api.chat.completions.create(model=name, messages=messages, temperature=0, stream=True,
                                                  stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == expected
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == [reply.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
        assert len({c.id for c in chunks}) == 1


def test_prompt_tokens_are_the_chat_template(servers):
    from mindglm.chat import build_chat_ids
    model, tokenizer, _, _ = reference_chat(TINY_CONFIGS["chatglm2"])
    case = golden_cases("chatglm2")[1]
    reply = client(servers["chatglm2"]).chat.completions.create(
        messages=to_messages(case["query"], case["history"], "chatglm2"), model="chatglm2-e2e",
        temperature=0, max_tokens=3)
    assert reply.usage.prompt_tokens == len(build_chat_ids(tokenizer, "chatglm2", case["query"], case["history"]))
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"


def test_system_prompt_and_tools_reach_the_chatglm3_template(servers):
    from mindglm.chat import system_messages
    model, tokenizer, settings, _ = reference_chat(TINY_CONFIGS["chatglm3"])
    tools = [{"name": "get_weather", "description": "Weather of a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    history = system_messages("You are terse.", tools)
    expected, _ = model.chat(tokenizer, "北京天气", history, **settings)
    reply = client(servers["chatglm3"]).chat.completions.create(
        model="chatglm3-e2e", temperature=0,
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "北京天气"}],
        tools=[{"type": "function", "function": tool} for tool in tools])
    assert reply.choices[0].message.content == expected


def test_eight_concurrent_streams_equal_their_solo_replies(servers):
    server = servers["chatglm3"]
    queries = [f"第{i}个问题：{'天空为什么是蓝色的' if i % 2 else '讲个故事'}" for i in range(8)]
    budgets = [24 + 9 * i for i in range(8)]  # different lengths: rows leave the batch at different steps
    api = client(server)
    solo = [api.chat.completions.create(model="chatglm3-e2e", messages=[{"role": "user", "content": q}],
                                        temperature=0, max_tokens=b).choices[0].message.content
            for q, b in zip(queries, budgets)]

    async def stream(api, query, budget):
        text = ""
        async for chunk in await api.chat.completions.create(
                model="chatglm3-e2e", messages=[{"role": "user", "content": query}], temperature=0,
                max_tokens=budget, stream=True):
            text += chunk.choices[0].delta.content or ""
        return text

    async def together():
        api = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        return await asyncio.gather(*(stream(api, q, b) for q, b in zip(queries, budgets)))

    running = []
    watcher_done = threading.Event()

    def watch():  # how many ran at once, from the server's own gauge
        while not watcher_done.is_set():
            running.append(server.metric("mindglm:num_requests_running"))
            time.sleep(0.05)

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        concurrent = asyncio.run(together())
    finally:
        watcher_done.set()
        thread.join()
    assert concurrent == solo
    assert max(running) > 1


def test_completions_are_raw_text_generation(servers):
    _, tokenizer, _, _ = reference_chat(TINY_CONFIGS["chatglm2"])
    prompt = "The quick brown fox"
    ids, new = reference_new_ids("chatglm2", prompt, 12)
    api = client(servers["chatglm2"])
    reply = api.completions.create(model="chatglm2-e2e", prompt=prompt, max_tokens=12, temperature=0)
    assert reply.choices[0].text == tokenizer.decode(new)
    assert reply.usage.prompt_tokens == len(ids) and reply.object == "text_completion"
    by_ids = api.completions.create(model="chatglm2-e2e", prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == reply.choices[0].text
    streamed = "".join(c.choices[0].text for c in api.completions.create(
        model="chatglm2-e2e", prompt=prompt, max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == reply.choices[0].text


def test_stop_strings_cut_the_reply_and_free_the_row(servers):
    api = client(servers["chatglm2"])
    messages = [{"role": "user", "content": "你好"}]
    full = api.chat.completions.create(model="chatglm2-e2e", messages=messages, temperature=0, max_tokens=60)
    text = full.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = text[:text.index(stop)].strip()
    reply = api.chat.completions.create(model="chatglm2-e2e", messages=messages, temperature=0, max_tokens=60,
                                        stop=[stop, "never-appears"])
    assert reply.choices[0].message.content == cut
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < full.usage.completion_tokens
    streamed = list(api.chat.completions.create(model="chatglm2-e2e", messages=messages, temperature=0,
                                                max_tokens=60, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


def reference_new_ids(family, prompt, budget):
    """Greedy new ids of the in-process model for a raw prompt (eos and after dropped)."""
    import numpy as np
    model, tokenizer, _, _ = reference_chat(TINY_CONFIGS[family])
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    new = [int(i) for i in model.generate(np.asarray([ids]), max_new_tokens=budget, do_sample=False)[0, len(ids):]]
    return ids, new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new


def test_stop_token_ids_and_sampling_settings(servers):
    api = client(servers["chatglm2"])
    _, tokenizer, _, _ = reference_chat(TINY_CONFIGS["chatglm2"])
    messages = [{"role": "user", "content": "你好"}]
    _, new = reference_new_ids("chatglm2", "你好", 8)
    at = next(i for i in range(1, len(new)) if new[i] not in new[:i])
    cut = api.completions.create(model="chatglm2-e2e", prompt="你好", max_tokens=8, temperature=0,
                                 extra_body={"stop_token_ids": [new[at]]})
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens == at + 1
    assert cut.choices[0].text == tokenizer.decode(new[:at])
    # the same seed samples the same reply; top_k=1 is greedy whatever the temperature
    seeded = [api.chat.completions.create(model="chatglm2-e2e", messages=messages, temperature=1.0, top_p=0.9,
                                          seed=7, max_tokens=16).choices[0].message.content for _ in range(2)]
    assert seeded[0] == seeded[1]
    greedy = api.chat.completions.create(model="chatglm2-e2e", messages=messages, temperature=0, max_tokens=16)
    top1 = api.chat.completions.create(model="chatglm2-e2e", messages=messages, temperature=1.5, max_tokens=16,
                                       extra_body={"top_k": 1, "repetition_penalty": 1.0})
    assert top1.choices[0].message.content == greedy.choices[0].message.content


# ---------------------------------------------------------------------------------- errors
def assert_error(response, status, param=None, match=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == status and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    if match is not None:
        assert match in body["error"]["message"], body["error"]["message"]
    return body["error"]


def test_bad_requests_are_400_in_openai_shape(servers):
    url = servers["chatglm3"].url + "/v1/chat/completions"
    user = [{"role": "user", "content": "hi"}]
    assert_error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400,
                 match="malformed JSON")
    assert_error(httpx.post(url, json=[1, 2]), 400, match="JSON object")
    assert_error(httpx.post(url, json={"messages": user, "temperature": 5}), 400, param="temperature")
    assert_error(httpx.post(url, json={"messages": []}), 400, param="messages")
    assert_error(httpx.post(url, json={"messages": [{"role": "robot", "content": "x"}]}), 400, param="messages")
    assert_error(httpx.post(url, json={"messages": user, "n": 2}), 400, param="n")
    assert_error(httpx.post(url, json={"messages": user, "max_tokens": 0}), 400, param="max_tokens")
    assert_error(httpx.post(url, json={"messages": [{"role": "assistant", "content": "x"}]}), 400,
                 param="messages", match="last message")
    assert_error(httpx.post(servers["chatglm2"].url + "/v1/chat/completions",
                            json={"messages": user, "tools": [{"type": "function", "function": {"name": "f"}}]}),
                 400, param="tools", match="ChatGLM3")
    assert_error(httpx.post(servers["chatglm"].url + "/v1/completions", json={"prompt": ""}), 400, param="prompt")
    with pytest.raises(openai.BadRequestError):
        client(servers["chatglm3"]).chat.completions.create(model="chatglm3-e2e", messages=user, top_p=0)


def test_unknown_model_is_404(servers):
    response = httpx.post(servers["chatglm3"].url + "/v1/chat/completions",
                          json={"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})
    assert_error(response, 404, param="model", match="gpt-4")
    with pytest.raises(openai.NotFoundError):
        client(servers["chatglm3"]).completions.create(model="gpt-4", prompt="hi")


def test_prompt_too_long_is_400_with_vllms_message(servers):
    server = servers["chatglm2"]
    max_len = httpx.get(server.url + "/v1/models").json()["data"][0]["max_model_len"]
    response = httpx.post(server.url + "/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": "很长的问题" * max_len}], "max_tokens": 4})
    error = assert_error(response, 400, match=f"This model's maximum context length is {max_len} tokens. "
                                              "However, you requested")
    assert "in the messages" in error["message"]


def test_api_key_is_required_when_set(servers):
    server = servers["guarded"]
    url, user = server.url + "/v1/chat/completions", [{"role": "user", "content": "hi"}]
    assert_error(httpx.post(url, json={"messages": user}), 401, match="API key")
    assert_error(httpx.post(url, json={"messages": user}, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.get(server.url + "/v1/models"), 401)
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong").chat.completions.create(model="guarded", messages=user)
    ok = client(server, API_KEY).chat.completions.create(model="guarded", messages=user, max_tokens=2)
    assert ok.usage.completion_tokens == 2
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_full_queue_is_429(servers):
    """One row, one waiting place: the third concurrent request is refused."""
    server = servers["guarded"]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 200, "temperature": 0,
            "ignore_eos": True}

    async def three():
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120) as http:
            first = asyncio.ensure_future(http.post("/v1/chat/completions", json=body))
            await _until(lambda: server.metric("mindglm:num_requests_running") == 1)
            second = asyncio.ensure_future(http.post("/v1/chat/completions", json=body))
            await _until(lambda: server.metric("mindglm:num_requests_waiting") == 1)
            third = await http.post("/v1/chat/completions", json=body)
            return third, await first, await second

    third, first, second = asyncio.run(three())
    assert_error(third, 429, match="retry")
    assert first.status_code == second.status_code == 200
    assert first.json()["usage"]["completion_tokens"] == 200


async def _until(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def _wait(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------- disconnects
@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_its_row(servers, stream):
    server = servers["guarded"]
    aborted = server.metric('mindglm:request_success_total{finished_reason="abort"')
    body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 240, "ignore_eos": True,
            "temperature": 0, "stream": stream}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=120) as http:
        if stream:
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = response.iter_lines()
                for _ in range(6):
                    next(lines)
                assert server.metric("mindglm:cache_rows_in_use") == 1
        else:
            # A raw connection closed as soon as the request runs: no client timeout to race a
            # fast machine's reply (a tiny model writes the whole reply in well under a second).
            payload = json.dumps(dict(body, max_tokens=480)).encode()
            with socket.create_connection(("127.0.0.1", server.port)) as raw:
                raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                            b"Content-Type: application/json\r\nAuthorization: Bearer " + API_KEY.encode()
                            + b"\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
                _wait(lambda: server.metric("mindglm:cache_rows_in_use") == 1, timeout=30)
    _wait(lambda: server.metric("mindglm:cache_rows_in_use") == 0, timeout=10)
    assert server.metric("mindglm:num_requests_running") == 0
    assert server.metric('mindglm:request_success_total{finished_reason="abort"') == aborted + 1
    # the one row is free: a new request runs at once
    reply = client(server, API_KEY).chat.completions.create(model="guarded", messages=body["messages"], max_tokens=3)
    assert reply.usage.completion_tokens == 3


# ---------------------------------------------------------------------------------- health, metrics, models
def test_models_health_and_metrics(servers):
    server = servers["chatglm3"]
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "chatglm3-e2e"
    assert models["data"][0]["max_model_len"] == 512
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    before = server.metrics()
    client(server).chat.completions.create(model="chatglm3-e2e", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=5, extra_body={"ignore_eos": True})
    after = server.metrics()
    label = '{model_name="chatglm3-e2e"}'
    assert after["mindglm:generation_tokens_total" + label] - before["mindglm:generation_tokens_total" + label] == 5
    assert after["mindglm:prompt_tokens_total" + label] > before["mindglm:prompt_tokens_total" + label]
    assert after["mindglm:time_to_first_token_seconds_count" + label] == \
        before["mindglm:time_to_first_token_seconds_count" + label] + 1
    assert after["mindglm:time_per_output_token_seconds_count" + label] == \
        before["mindglm:time_per_output_token_seconds_count" + label] + 4
    assert after["mindglm:max_num_seqs" + label] == 8
    # warm-up compiled the graphs; serving compiled nothing more
    assert after["mindglm:graph_compiles" + label] == before["mindglm:graph_compiles" + label]


def test_health_is_503_while_warming_up_and_draining():
    """In-process: before the engine thread has warmed up, and once draining, /health and the API say 503."""
    from fastapi.testclient import TestClient
    from mindglm.serving import ServerState, create_app
    model, tokenizer, _, _ = reference_chat(TINY_CONFIGS["chatglm"])
    state = ServerState(model, tokenizer, "warming")  # its engine loop is not started: not warmed up
    http = TestClient(create_app(state))
    assert_error(http.get("/health"), 503, match="warming up")
    assert_error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}), 503)
    state.loop.ready.set()
    assert http.get("/health").status_code == 200
    state.draining = True
    assert_error(http.get("/health"), 503, match="shutting down")


def test_sigterm_drains_then_exits_zero(tmp_path):
    """Running replies finish, new requests get 503 meanwhile, a reply past the grace period gets an
    error inside its stream, then the process exits with status 0."""
    # a longer context than the fixture's, so that the long reply cannot finish within the grace period
    # one prefill bucket and two cache rows (the two replies): a third of the warm-up (61 -> 20 s)
    server = LiveServer(["--config", TINY_CONFIGS["chatglm2"], "--drain-timeout", "2", *FEW_BUCKETS,
                         "--max-num-seqs", "2", "--set", "model.model_config.seq_length=2048"],
                        str(tmp_path / "drain.log"))
    server.wait_healthy()
    results, streaming = {}, {"short": threading.Event(), "long": threading.Event()}

    def run(name, budget):
        body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": budget, "temperature": 0,
                "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    streaming[name].set()
        results[name] = events

    try:
        short = threading.Thread(target=run, args=("short", 40))
        long = threading.Thread(target=run, args=("long", 2000))
        long.start()
        assert streaming["long"].wait(60), "the long reply never started"
        short.start()
        # the short reply's first token, not a poll of the running count: on a loaded machine a
        # 40-token reply could come and go between two polls of /metrics (the test then waited forever)
        assert streaming["short"].wait(60), "the short reply never started"
        server.process.send_signal(signal.SIGTERM)
        _wait(lambda: httpx.get(server.url + "/health").status_code == 503, timeout=10)
        assert_error(httpx.post(server.url + "/v1/chat/completions",
                                json={"messages": [{"role": "user", "content": "hi"}]}), 503, match="shutting down")
        short.join(60)
        long.join(60)
        assert server.process.wait(60) == 0
    finally:
        server.stop()
    short_events = [json.loads(e) for e in results["short"][:-1]]
    assert results["short"][-1] == "[DONE]" and short_events[-1]["choices"][0]["finish_reason"] == "length"
    long_events = results["long"]
    assert long_events[-1] == "[DONE]"
    error = json.loads(long_events[-2])["error"]
    assert error["code"] == 503 and "shutting down" in error["message"]
    assert "drain" in server.log()


# ---------------------------------------------------------------------------------- units (no server)
def v3_tokenizer():
    import mindglm
    return mindglm.load_tokenizer(os.path.join(FIXTURES, "chat", "chatglm3-e2e"))


WEATHER_TOOLS = [{"name": "get_weather", "description": "Weather of a city",
                  "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]


def test_a_chatglm3_tool_call_comes_back_as_tool_calls():
    """The ids ChatGLM3 writes for a tool call: nothing streamed as content, then tool_calls."""
    from mindglm.chat import stop_token_ids, system_messages
    from mindglm.serving.replies import Reply
    tokenizer = v3_tokenizer()
    ids = tokenizer.encode_plain("get_weather\n```python\ntool_call(city='北京', days=2)\n```")
    reply = Reply(tokenizer, "chatglm3", True, system_messages(None, WEATHER_TOOLS), [], stop_token_ids(tokenizer))
    deltas = [reply.push([i]) for i in ids] + [reply.push([tokenizer.role_token_id("observation")], True)]
    assert deltas == [""] * len(deltas)
    final = reply.finish("tool_calls")
    assert final.text is None and final.finish_reason == "tool_calls" and len(final.tool_calls) == 1
    call = final.tool_calls[0]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "北京", "days": 2}
    # a call whose arguments are not literals is never evaluated: it stays text
    unsafe = Reply(tokenizer, "chatglm3", True, system_messages(None, WEATHER_TOOLS), [], [])
    unsafe.push(tokenizer.encode_plain("get_weather\n```python\ntool_call(city=__import__('os'))\n```"))
    final = unsafe.finish("tool_calls")
    assert final.tool_calls == [] and final.finish_reason == "stop" and "tool_call(" in final.text


def test_tool_turns_build_chatglm3s_own_prompt():
    """OpenAI's assistant tool_calls + tool message = ChatGLM3's assistant metadata turn + observation."""
    from mindglm.chat import build_chat_ids, system_messages
    from mindglm.serving.prompts import chat_prompt
    from mindglm.serving.protocol import ChatCompletionRequest
    tokenizer = v3_tokenizer()
    request = ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": "北京天气"},
                     {"role": "assistant", "content": None, "tool_calls": [
                         {"id": "call_1", "type": "function",
                          "function": {"name": "get_weather", "arguments": "{\"city\": \"北京\"}"}}]},
                     {"role": "tool", "content": "{\"temperature\": 20}"}],
        "tools": [{"type": "function", "function": WEATHER_TOOLS[0]}]})
    prompt = chat_prompt(request, tokenizer, "chatglm3")
    history = system_messages(None, WEATHER_TOOLS) + [
        {"role": "user", "content": "北京天气"},
        {"role": "assistant", "metadata": "get_weather", "content": "```python\ntool_call(city='北京')\n```"}]
    assert prompt.ids == build_chat_ids(tokenizer, "chatglm3", "{\"temperature\": 20}", history, role="observation")
    assert prompt.tool_call_ids == [tokenizer.role_token_id("observation")] and prompt.has_tools


def test_stop_string_tails_are_held_back_until_they_settle():
    from mindglm.serving.replies import Reply
    tokenizer = v3_tokenizer()
    reply = Reply(tokenizer, "chatglm3", False, [], ["xyz"], [])
    first, second, third = (tokenizer.encode_plain(text) for text in ("hello world. x", "q", " then xyz and more"))
    sent = "".join(reply.push([i]) for i in first)
    assert sent == "hello world. "  # "x" may start "xyz": not sent yet
    assert reply.push(second).startswith("x") and not reply.stopped  # "xq" cannot: released
    reply.push(third)
    full = tokenizer.decode(first + second + third)
    final = reply.finish("length")
    assert reply.stopped and final.finish_reason == "stop" and final.text == full[:full.index("xyz")]
