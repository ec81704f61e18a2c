"""End to end: chat() and stream_chat() on the converted e2e models reproduce the reference replies."""
import json
import os

import pytest

import mindglm
from conftest import FIXTURES, load_converted

FAMILIES = ("chatglm", "chatglm2", "chatglm3")


def e2e_dir(family):
    return os.path.join(FIXTURES, "chat", f"{family}-e2e")


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """{family: (model, tokenizer, cases)} with weights converted to .ckpt first."""
    out = tmp_path_factory.mktemp("e2e")
    loaded = {}
    for family in FAMILIES:
        model = load_converted(e2e_dir(family), str(out / f"{family}.ckpt"))
        tokenizer = mindglm.load_tokenizer(e2e_dir(family))
        with open(os.path.join(e2e_dir(family), "chat_golden.json"), encoding="utf-8") as fh:
            loaded[family] = (model, tokenizer, json.load(fh))
    return loaded


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_reproduces_reference_replies(e2e, family):
    model, tokenizer, cases = e2e[family]
    for case in cases:
        response, history = model.chat(tokenizer, case["query"], case["history"], do_sample=False, max_length=128)
        assert response == case["response"]
        assert len(history) == len(case["history"]) + (2 if family == "chatglm3" else 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_stream_chat_ends_with_chat_reply(e2e, family):
    model, tokenizer, cases = e2e[family]
    case = cases[-1]
    chunks = list(model.stream_chat(tokenizer, case["query"], case["history"], do_sample=False, max_length=128))
    texts = [text for text, _ in chunks]
    assert texts[-1] == case["response"]
    assert len(texts) > 10
    assert all("\ufffd" not in text for text in texts)
    # the reply only grows (v1's punctuation normalisation may rewrite the tail, never the head)
    assert all(texts[i + 1].startswith(texts[i][: len(texts[i]) - 2]) for i in range(len(texts) - 1))


def test_history_round_trip(e2e):
    """Turn 2 built from turn 1's returned history equals a one-shot call with that history."""
    model, tokenizer, _ = e2e["chatglm2"]
    first, history = model.chat(tokenizer, "你好", [], do_sample=False, max_new_tokens=8)
    assert history == [("你好", first)] or history == [["你好", first]]
    second, history2 = model.chat(tokenizer, "再说一遍", history, do_sample=False, max_new_tokens=8)
    again, _ = model.chat(tokenizer, "再说一遍", [("你好", first)], do_sample=False, max_new_tokens=8)
    assert second == again and len(history2) == 2


def test_prompt_longer_than_context_is_an_error_or_truncated(e2e):
    model, tokenizer, _ = e2e["chatglm2"]
    long_turn = ("很长的问题" * 40, "很长的回答" * 40)
    history = [long_turn] * 4
    with pytest.raises(ValueError, match="context"):
        model.chat(tokenizer, "最后", history, max_new_tokens=4)
    response, new_history = model.chat(tokenizer, "最后", history, max_new_tokens=4, truncate_history=True)
    assert 1 <= len(new_history) < len(history) + 1 and new_history[-1][0] == "最后"


def test_chatglm3_stops_on_role_tokens(e2e):
    model, tokenizer, _ = e2e["chatglm3"]
    from mindglm.chat import stop_token_ids
    stops = stop_token_ids(tokenizer, "chatglm3")
    assert {tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>"),
            tokenizer.eos_token_id} <= set(stops)


def test_chat_refuses_eos_override_and_a_budget_with_no_room(e2e):
    from mindglm.chat import ChatError
    model, tokenizer, _ = e2e["chatglm3"]
    with pytest.raises(ChatError, match="stop tokens"):
        model.chat(tokenizer, "你好", eos_token_id=5)
    with pytest.raises(ChatError, match="max_length"):
        model.chat(tokenizer, "你好", max_length=4)
