"""The chat page at `/`, in a real headless Chromium (Debian's `chromium`, driven by playwright):
streamed replies equal `model.chat()`, history, stop mid-reply, clear, system prompt and tools."""
from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from conftest import reference_chat
from live_server import TINY_CONFIGS

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:  # .ci/run installs Debian's chromium; a bare dev machine may lack it
    pytest.skip("no chromium binary (apt-get install chromium, or set CHROMIUM=/path)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

CONFIG = TINY_CONFIGS["chatglm3"]


@pytest.fixture(scope="module")
def server(live_servers):
    return live_servers.get("chatglm3")["chatglm3"]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(server, browser):
    page = browser.new_page()
    page.requests = []
    page.on("request", lambda request: page.requests.append(request.url))
    page.goto(server.url + "/")
    page.fill("#temperature", "0")
    yield page
    page.close()


def wait_status(page, text, timeout=60000):
    page.wait_for_function(f"document.querySelector('#status').textContent === {json.dumps(text)}",
                           timeout=timeout)


def send(page, text):
    """Type `text`, press Enter, wait for the reply; the reply's text and how many times it changed."""
    page.evaluate("""() => {
        window.updates = 0;
        new MutationObserver(() => window.updates++).observe(document.querySelector('#log'),
                                                               {subtree: true, characterData: true, childList: true});
    }""")
    replies = page.locator(".msg.assistant").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    # (a fast reply can be over before a poll would see "generating…")
    page.wait_for_function(f"document.querySelectorAll('.msg.assistant').length > {replies} && "
                           "document.querySelector('#status').textContent === 'ready'", timeout=60000)
    return page.locator(".msg.assistant .text").last.inner_text(), page.evaluate("window.updates")


def test_streamed_reply_equals_chat_and_history_carries_over(page, server):
    model, tokenizer, settings, _ = reference_chat(CONFIG)
    settings = {**settings, "max_new_tokens": 60}  # turn 2's prompt is longer than the config's max_length
    page.fill("#max_tokens", "60")
    first, history = model.chat(tokenizer, "你好", [], **settings)
    text, updates = send(page, "你好")
    assert text == first
    assert updates > 5  # it arrived in pieces, not at the end
    second, _ = model.chat(tokenizer, "再说一遍", history, **settings)
    assert send(page, "再说一遍")[0] == second
    assert page.locator(".msg.user").count() == 2
    # nothing but this server was asked for anything
    assert page.requests and all(url.startswith(server.url + "/") for url in page.requests)


def test_stop_mid_reply_frees_the_row_then_clear(page, server):
    model, tokenizer, settings, _ = reference_chat(CONFIG)
    # a reply that runs to its budget (no eos), long enough to be stopped half-way
    full, _ = model.chat(tokenizer, "你好", [], **{**settings, "max_new_tokens": 480, "max_length": None})
    assert len(full) > 600
    aborted = server.metric('mindglm:request_success_total{finished_reason="abort"')
    page.fill("#max_tokens", "480")
    page.fill("#input", "你好")
    page.press("#input", "Enter")
    reply = page.locator(".msg.assistant .text").last
    page.wait_for_function("document.querySelectorAll('.msg.assistant .text')[0].textContent.length > 3")
    page.click("#stop")
    wait_status(page, "stopped")
    partial = reply.inner_text()
    assert partial and full.startswith(partial) and len(partial) < len(full)
    assert "stopped" in page.locator(".msg.assistant").last.inner_text()
    deadline = time.monotonic() + 10
    while server.metric("mindglm:cache_rows_in_use") != 0:
        assert time.monotonic() < deadline, "the stopped reply still holds its cache row"
        time.sleep(0.05)
    assert server.metric('mindglm:request_success_total{finished_reason="abort"') == aborted + 1
    page.click("#clear")
    assert page.locator(".msg").count() == 0
    page.fill("#max_tokens", "")
    expected, _ = model.chat(tokenizer, "你好", [], **settings)  # no history after clear
    assert send(page, "你好")[0] == expected


def test_system_prompt_and_tools_box(page):
    from mindglm.chat import system_messages
    model, tokenizer, settings, _ = reference_chat(CONFIG)
    tools = [{"name": "get_weather", "description": "Weather of a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    assert page.locator("#tools-field").is_visible()
    page.fill("#system", "Answer briefly.")
    page.fill("#tools", json.dumps(tools))
    expected, _ = model.chat(tokenizer, "北京天气", system_messages("Answer briefly.", tools), **settings)
    assert send(page, "北京天气")[0] == expected
    page.fill("#tools", "[not json")
    page.fill("#input", "hi")
    page.press("#input", "Enter")
    assert "tools:" in page.locator(".msg.error").last.inner_text()
