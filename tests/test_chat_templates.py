"""Chat templates, response post-processing, tool calls and streaming against the reference fixtures."""
import builtins
import json
import os

import numpy as np
import pytest

from mindglm.chat import (ChatError, StreamDecoder, build_chat_ids, build_prompt, decode_reply,
                          decode_stream_text, finish_turn, parse_tool_call, process_response, stop_token_ids,
                          update_history)
from mindglm.tokenization import load_tokenizer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TOKENIZER_DIR = os.path.join(FIXTURES, "tokenizers")
VOCAB_FILES = {"chatglm": "ice_text.model", "chatglm2": "tokenizer.model", "chatglm3": "tokenizer.model"}
FAMILIES = tuple(VOCAB_FILES)
_TOKENIZERS = {}


def tokenizer_for(family):
    if family not in _TOKENIZERS:
        _TOKENIZERS[family] = load_tokenizer(os.path.join(TOKENIZER_DIR, VOCAB_FILES[family]), family=family)
    return _TOKENIZERS[family]


def read_cases(family, kind="chat_prompt"):
    with open(os.path.join(TOKENIZER_DIR, f"{family}_cases.jsonl"), encoding="utf-8") as handle:
        return [case for case in map(json.loads, handle) if case["kind"] == kind]


def eos_id(family):
    with open(os.path.join(FIXTURES, "chat", f"{family}-e2e", "config.json"), encoding="utf-8") as handle:
        return json.load(handle)["eos_token_id"]


def v3_case(predicate):
    return next(case for case in read_cases("chatglm3") if predicate(case))


PROMPT_CASES = [(family, index, case) for family in FAMILIES for index, case in enumerate(read_cases(family))]


@pytest.mark.parametrize("family,index,case", PROMPT_CASES, ids=[f"{f}-{i}" for f, i, _ in PROMPT_CASES])
def test_chat_prompt_ids_match_reference(family, index, case):
    tok = tokenizer_for(family)
    ids = build_chat_ids(tok, family, case["query"], case["history"], role=case.get("role", "user"))
    assert ids == case["ids"]
    if "prompt" in case:
        assert build_prompt(family, case["query"], case["history"]) == case["prompt"]
    assert build_chat_ids(tok, None, case["query"], case["history"], role=case.get("role", "user")) == ids


# ---------------------------------------------------------------------- history round trips
@pytest.mark.parametrize("family", ["chatglm", "chatglm2"])
def test_pair_history_round_trip(family):
    tok = tokenizer_for(family)
    first, second = read_cases(family)[:2]
    (query, reply), = second["history"]
    assert query == first["query"]
    # The model's reply as generated ids (+ eos) gives back the fixture's history and next prompt.
    new_ids = tok.encode(reply, add_special_tokens=False) + [eos_id(family)]
    response, history = finish_turn(tok, family, first["query"], first["history"], new_ids)
    assert response == reply
    assert [list(turn) for turn in history] == second["history"]
    assert build_chat_ids(tok, family, second["query"], history) == second["ids"]


def test_v3_history_round_trip_from_reference_ids():
    tok = tokenizer_for("chatglm3")
    first, second = read_cases("chatglm3")[:2]
    assistant, user = tok.get_command("<|assistant|>"), tok.get_command("<|user|>")
    # What the model generated after the first prompt: the assistant turn inside the second prompt,
    # ended by <|user|> (a stop token), e.g. "\n你好👋！...".
    start = second["ids"].index(assistant) + 1
    new_ids = second["ids"][start:second["ids"].index(user, start)] + [user]
    response, history = finish_turn(tok, "chatglm3", first["query"], first["history"], new_ids)
    assert response == second["history"][1]["content"]
    assert history == second["history"]
    assert build_chat_ids(tok, "chatglm3", second["query"], history) == second["ids"]


def test_v3_tool_call_round_trip_to_observation_prompt():
    tok = tokenizer_for("chatglm3")
    ask = v3_case(lambda c: c["history"] and c["history"][0].get("tools") and "role" not in c)
    observe = v3_case(lambda c: c.get("role") == "observation")
    call = observe["history"][-1]
    output = call["metadata"] + "\n" + call["content"]
    response = process_response("chatglm3", output, ask["history"])
    assert response == {"name": call["metadata"], "parameters": {"city": "北京"}}
    history = update_history("chatglm3", ask["history"], ask["query"], output)
    assert history == observe["history"]
    assert build_chat_ids(tok, "chatglm3", observe["query"], history, role="observation") == observe["ids"]


def test_update_history_does_not_modify_its_input():
    history = [{"role": "user", "content": "Q"}, {"role": "assistant", "metadata": "", "content": "A"}]
    snapshot = json.dumps(history)
    new = update_history("chatglm3", history, "Q2", "\nA2")
    assert json.dumps(history) == snapshot
    assert new[-2:] == [{"role": "user", "content": "Q2"}, {"role": "assistant", "metadata": "", "content": "A2"}]
    pairs = [("q", "a")]
    assert update_history("chatglm2", pairs, "q2", " a2 ") == [("q", "a"), ("q2", "a2")] and pairs == [("q", "a")]


# ---------------------------------------------------------------------- ChatGLM3 responses
TOOLS_HISTORY = [{"role": "system", "content": "Use tools.", "tools": [{"name": "get_weather"}]}]


def test_v3_plain_reply_strips_and_replaces_training_time():
    assert process_response("chatglm3", "\n  我的数据截至[[训练时间]]。 \n") == "我的数据截至2023年。"
    assert process_response("chatglm3", "no newline at all") == "no newline at all"


def test_v3_well_formed_tool_call_with_several_literal_arguments():
    output = "track\n```python\ntool_call(symbol=\"AAPL\", days=3, weights=[0.5, 1.5], opts={'x': None})\n```"
    assert process_response("chatglm3", output, TOOLS_HISTORY) == {
        "name": "track", "parameters": {"symbol": "AAPL", "days": 3, "weights": [0.5, 1.5], "opts": {"x": None}}}
    fenceless = "track\ntool_call(symbol='AAPL')"
    assert process_response("chatglm3", fenceless, TOOLS_HISTORY) == {"name": "track", "parameters": {"symbol": "AAPL"}}


def test_v3_metadata_without_tools_is_name_and_content():
    output = "interpreter\n```python\nprint(1)\n```"
    assert process_response("chatglm3", output, []) == {"name": "interpreter", "content": "```python\nprint(1)\n```"}


def test_v3_last_assistant_segment_wins_and_every_segment_enters_history():
    output = "get_weather\n```python\ntool_call(city='上海')\n```<|assistant|>\n 好的 "
    assert process_response("chatglm3", output, TOOLS_HISTORY) == "好的"
    history = update_history("chatglm3", TOOLS_HISTORY, "天气?", output)
    assert history[-2:] == [
        {"role": "assistant", "metadata": "get_weather", "content": "```python\ntool_call(city='上海')\n```"},
        {"role": "assistant", "metadata": "", "content": "好的"}]


MALICIOUS_CALLS = [
    "tool_call(__import__('os').system('touch {marker}'))",
    "tool_call(city=__import__('os').system('touch {marker}'))",
    "tool_call(city=open('{marker}', 'w').write('x'))",
    "__import__('os').system('touch {marker}')",
    "tool_call(**{{'city': 'x'}})",
    "tool_call('positional')",
    "tool_call(city='a', city='b')",
    "tool_call(city=(lambda: 1)())",
    "tool_call(city=os.environ)",
    "tool_call(city='unterminated",
    "print('hello')",
    "tool_call(n=" + "9" * 5000 + ")",
    "tool_call(x=" + "[" * 500 + "]" * 500 + ")",
]


@pytest.mark.parametrize("code", MALICIOUS_CALLS)
def test_v3_malformed_tool_calls_are_text_and_never_executed(code, tmp_path, monkeypatch):
    marker = tmp_path / "executed"
    code = code.format(marker=marker)
    calls = []
    monkeypatch.setattr(os, "system", lambda *args: calls.append(args))
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: calls.append(name) or real_import(name, *a, **k))
    content = f"```python\n{code}\n```"
    response = process_response("chatglm3", "get_weather\n" + content, TOOLS_HISTORY)
    monkeypatch.undo()
    assert response == content
    assert parse_tool_call(code) is None
    assert not marker.exists() and calls == []


def test_parse_tool_call_accepts_dict_literal_and_empty_call():
    assert parse_tool_call("{'city': '北京'}") == {"city": "北京"}
    assert parse_tool_call("tool_call()") == {}
    assert parse_tool_call("[1, 2]") is None


# ---------------------------------------------------------------------- ChatGLM-6B / 2 responses
@pytest.mark.parametrize("raw,expected", [
    ("你好,世界!", "你好，世界！"),
    ("价格:100元;数量?", "价格：100元；数量？"),
    ("中文,English", "中文，English"),
    ("English,中文", "English，中文"),
    ("Hello, world! a:b;c?", "Hello, world! a:b;c?"),
    ("好,,吗", "好，，吗"),
    ("  我的知识截至[[训练时间]]。\n", "我的知识截至2023年。"),
    ("ｶﾀｶﾅ,テスト", "ｶﾀｶﾅ,テスト"),  # kana are outside U+4E00..U+9FFF: left alone
])
def test_v1_punctuation_next_to_cjk_becomes_full_width(raw, expected):
    assert process_response("chatglm", raw) == expected


def test_v2_only_strips_and_replaces_training_time():
    assert process_response("chatglm2", "  你好,世界! [[训练时间]]\n") == "你好,世界! 2023年"


# ---------------------------------------------------------------------- stop tokens and decoding
def test_stop_token_ids_per_family():
    v3 = tokenizer_for("chatglm3")
    assert stop_token_ids(tokenizer_for("chatglm"), "chatglm") == [eos_id("chatglm")]
    assert stop_token_ids(tokenizer_for("chatglm2"), "chatglm2") == [eos_id("chatglm2")]
    user_id = read_cases("chatglm3")[0]["ids"][2]  # [gMASK] sop <|user|> ...
    observe = v3_case(lambda c: c.get("role") == "observation")
    # ... <|observation|> "\n" query <|assistant|>
    tail = len(v3.encode_plain("\n")) + len(v3.encode_plain(observe["query"])) + 1
    observation_id = observe["ids"][-tail - 1]
    assert stop_token_ids(v3) == [eos_id("chatglm3"), user_id, observation_id]


def test_decode_reply_drops_only_a_trailing_stop_token():
    tok = tokenizer_for("chatglm3")
    ids = tok.encode("好的", add_special_tokens=False)
    assert decode_reply(tok, "chatglm3", ids + [tok.get_command("<|observation|>")]) == "好的"
    assert decode_reply(tok, "chatglm3", ids) == "好的"  # ran into max_length: nothing cut
    assert decode_reply(tok, "chatglm3", ids + [tok.get_command("<|user|>")] + ids) == "好的<|user|> 好的"


@pytest.mark.parametrize("family", FAMILIES)
def test_stream_decoder_never_shows_broken_characters(family):
    tok = tokenizer_for(family)
    text = "你好👋！emoji 🎉 done"
    ids = tok.encode(text, add_special_tokens=False) + stop_token_ids(tok)[:1]
    final = tok.decode(ids)  # ChatGLM-6B's NFKC normaliser turns "！" into "!"
    assert final.replace("!", "！") == text
    stream = StreamDecoder(tok)
    shown = [stream.push(token_id) for token_id in ids]
    complete = [t for t in shown if t is not None]
    assert None in shown  # the emoji's byte pieces are incomplete for a few steps
    assert all("\ufffd" not in t for t in complete)
    assert all(final.startswith(t) for t in complete)
    assert final == complete[-1]
    assert decode_stream_text(tok, ids, family) == final


@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_stream_text_equals_a_full_decode_at_every_step(family):
    """The stream decoder re-decodes only a short tail, yet after every token its text is what
    decoding all the ids gives: on random ids (spaces, byte pieces, newlines, v1's blanks) and
    on a long mixed text."""
    tok = tokenizer_for(family)
    rng = np.random.default_rng(7)
    texts = ["Hello ,  world !  It 's   a\n\ttest …  with spaces  . 你好，世界！  ok ?" * 3]
    streams = [tok.encode(text, add_special_tokens=False) for text in texts]
    streams.append([int(i) for i in rng.integers(0, tok.sp.vocab_size(), size=300)])
    for ids in streams:
        stream, compared = StreamDecoder(tok), 0
        for end, token_id in enumerate(ids, start=1):
            shown = stream.push(token_id)
            if shown is not None:
                assert shown == decode_reply(tok, family, ids[:end]), (family, end)
                compared += 1
        assert compared > len(ids) // 2


# ---------------------------------------------------------------------- errors
def test_clear_errors_for_bad_chat_inputs():
    v2, v3 = tokenizer_for("chatglm2"), tokenizer_for("chatglm3")
    with pytest.raises(ChatError, match="message"):
        build_chat_ids(v3, "chatglm3", "q", [("q", "a")])
    with pytest.raises(ChatError, match="pair"):
        build_chat_ids(v2, "chatglm2", "q", [{"role": "user", "content": "q"}])
    for bad_turn in ["ab", 7, ("q",), ("q", None)]:
        with pytest.raises(ChatError, match="pair"):
            build_prompt("chatglm", "q", [bad_turn])
    with pytest.raises(ChatError, match="role"):
        build_chat_ids(v3, "chatglm3", "q", [{"role": "robot", "content": "x"}])
    with pytest.raises(ChatError, match="role"):
        build_chat_ids(v3, "chatglm3", "q", role="tool")
    with pytest.raises(ChatError, match="ChatGLM3 only"):
        build_chat_ids(v2, "chatglm2", "q", role="observation")
    with pytest.raises(ChatError, match="family='chatglm3'"):
        build_chat_ids(v2, "chatglm3", "q")
    with pytest.raises(ChatError, match="unknown chat family"):
        process_response("glm4", "x")
    with pytest.raises(ChatError, match="build_chat_ids"):
        build_prompt("chatglm3", "q")
