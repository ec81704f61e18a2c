"""mindglm.conversation: the model-free chat state a front end keeps (run_chat's session uses it)."""
import json
import os

import pytest

from conftest import reference_chat
from mindglm.chat import ChatError
from mindglm.conversation import Conversation, load_tools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = [{"name": "get_weather", "description": "weather", "parameters": {"type": "object"}}]


def test_v3_system_tools_observation_and_clear():
    conversation = Conversation("chatglm3")
    conversation.set_system("You are helpful.")
    conversation.set_tools(TOOLS)
    system = {"role": "system", "content": "You are helpful.", "tools": TOOLS}
    assert conversation.next_turn("北京天气") == ("北京天气", [system], "user")
    call = {"name": "get_weather", "parameters": {"city": "北京"}}
    asked = [system, {"role": "user", "content": "北京天气"},
             {"role": "assistant", "metadata": "get_weather", "content": json.dumps(call)}]
    conversation.finish_turn(call, asked)
    assert conversation.awaiting_observation and conversation.history == asked[1:]
    query, history, role = conversation.next_turn('{"temperature": 20}')
    assert role == "observation" and history == asked
    conversation.finish_turn("It is sunny", asked + [{"role": "observation", "content": query},
                                                     {"role": "assistant", "metadata": "", "content": "It is sunny"}])
    assert not conversation.awaiting_observation and len(conversation.history) == 4
    conversation.clear()
    assert conversation.history == [] and conversation.system_text == "You are helpful."
    conversation.set_system("")
    conversation.set_tools(None)
    assert conversation.system_messages() == []


@pytest.mark.parametrize("family", ["chatglm", "chatglm2"])
def test_v3_only_state_is_refused_elsewhere(family):
    conversation = Conversation(family)
    for action in (lambda: conversation.set_system("x"), lambda: conversation.set_tools(TOOLS),
                   lambda: conversation.next_turn("42", role="observation")):
        with pytest.raises(ChatError, match="needs a ChatGLM3 model"):
            action()
    assert conversation.next_turn("你好") == ("你好", [], "user")


def test_load_tools_errors_name_the_file(tmp_path):
    (tmp_path / "ok.json").write_text(json.dumps({"tools": TOOLS}))
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "wrong.json").write_text(json.dumps({"name": "x"}))
    assert load_tools(str(tmp_path / "ok.json")) == TOOLS
    with pytest.raises(ChatError, match="cannot read tools from .*bad.json"):
        load_tools(str(tmp_path / "bad.json"))
    with pytest.raises(ChatError, match="wrong.json: expected a JSON list of tool definitions"):
        load_tools(str(tmp_path / "wrong.json"))


def test_turns_through_a_real_model_keep_the_history_chat_returns():
    model, tokenizer, settings, _ = reference_chat(os.path.join(ROOT, "configs", "tiny", "chatglm3_e2e.yaml"),
                                                   ["generation.max_new_tokens=5"])
    conversation = Conversation("chatglm3")
    conversation.set_system("You are a poet.")
    first = model.chat(tokenizer, *conversation.next_turn("你好")[:2], **settings)
    conversation.finish_turn(*first)
    query, history, role = conversation.next_turn("再说一遍")
    assert history[0]["role"] == "system" and history[1:] == conversation.history == first[1][1:]
    response, new_history = model.chat(tokenizer, query, history, role=role, **settings)
    conversation.finish_turn(response, new_history)
    assert len(conversation.history) == 4 and conversation.history[-1]["content"] == response
