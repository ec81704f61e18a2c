"""tools/batch_infer.py on the tiny e2e models: batched replies equal one-by-one chat(), bad lines
are reported by line number, and an interrupted run resumes without gaps or duplicates."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import reference_chat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import batch_infer  # noqa: E402
from batch_infer import Request, parse_record, read_done_ids  # noqa: E402
from mindglm.chat import messages_to_turn  # noqa: E402

BATCH_INFER = os.path.join(REPO, "tools", "batch_infer.py")
TINY = {family: os.path.join(REPO, "configs", "tiny", f"{family}_e2e.yaml")
        for family in ("chatglm", "chatglm2", "chatglm3")}
ENV = {**os.environ, "GLOG_v": "3", "PYTHONIOENCODING": "utf-8"}

MIXED = [
    {"id": "short", "prompt": "你好"},
    {"id": "long", "prompt": "晚上睡不着应该怎么办？请详细说明一下原因和办法，越具体越好。"},
    {"id": "chat", "messages": [{"role": "user", "content": "你好"},
                                {"role": "assistant", "content": "你好！有什么可以帮你？"},
                                {"role": "user", "content": "讲个笑话"}]},
    {"id": 4, "prompt": "hello there, how are you today?"},
    {"id": "budget", "prompt": "写一首诗", "generation": {"max_new_tokens": 7}},
    {"id": "mid", "prompt": "什么是机器学习"},
]
V3_EXTRA = [
    {"id": "system", "messages": [{"role": "system", "content": "You are a poet."},
                                  {"role": "user", "content": "写一首诗"}]},
    {"id": "v3history", "prompt": "再说一遍",
     "history": [{"role": "user", "content": "你好"},
                 {"role": "assistant", "metadata": "", "content": "你好👋！"}]},
]


def run(args, timeout=240) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, BATCH_INFER, *args], capture_output=True, timeout=timeout,
                            cwd=REPO, env=ENV)
    # decoded by hand: text mode would turn the progress bar's \r into \n
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def write_jsonl(path, records, extra_lines=()):
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        for line in extra_lines:
            handle.write(line + "\n")
    return str(path)


def read_jsonl(path) -> list:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]




def expected_reply(model, tokenizer, settings, request: Request):
    return model.chat(tokenizer, request.query, request.history, role=request.role,
                      **{**settings, **request.generation})[0]


# ---------------------------------------------------------------------------------- end to end
BAD_LINES = [  # (line text, words of the report); appended to the ChatGLM3 input below
    ('{"id": "broken", "prompt": ', "invalid JSON"),
    (json.dumps({"id": "noprompt", "text": "hi"}), "'prompt'"),
    (json.dumps({"id": "short", "prompt": "again"}), "duplicate id 'short' (first on line 1)"),
    (json.dumps({"id": "lastassistant", "messages": [{"role": "user", "content": "a"},
                                                     {"role": "assistant", "content": "b"}]}),
     "the last message is the query"),
    (json.dumps({"id": "badgen", "prompt": "x", "generation": {"top_p": 3}}), "top_p"),
]


@pytest.mark.parametrize("family", ["chatglm", "chatglm2", "chatglm3"])
def test_batched_replies_equal_one_by_one_chat(tmp_path, family):
    from mindglm.chat import build_chat_ids
    records = MIXED + (V3_EXTRA if family == "chatglm3" else [])
    bad_lines = BAD_LINES if family == "chatglm3" else []
    source = write_jsonl(tmp_path / "in.jsonl", records, [line for line, _ in bad_lines])
    output = str(tmp_path / "out.jsonl")
    overrides = ["generation.max_length=72"]  # max_length: each row's budget depends on its own length
    result = run(["--config", TINY[family], "--input", source, "--output", output, "--batch-size", "3",
                  "--set", overrides[0]])
    assert result.returncode == 0, result.stderr
    assert "tok/s" in result.stderr and "\r[" in result.stderr and f"done: {len(records)} line(s)" in result.stderr
    # bad lines: reported with their line numbers, skipped, the rest runs
    for number, (_, words) in enumerate(bad_lines, start=len(records) + 1):
        report = next((line for line in result.stderr.splitlines() if line.startswith(f"{source}:{number}: ")), "")
        assert words in report and report.endswith("skipped"), (number, result.stderr)
    if bad_lines:
        assert f"{len(bad_lines)} bad line(s) skipped" in result.stderr

    rows = read_jsonl(output)
    assert sorted(map(str, (r["id"] for r in rows))) == sorted(map(str, (r["id"] for r in records)))
    by_id = {json.dumps(r["id"]): r for r in rows}
    model, tokenizer, settings, run_config = reference_chat(TINY[family], overrides)
    requests, _ = batch_infer.read_requests(source, family)
    requests = [r for r in requests if r.line <= len(records)]
    assert len(requests) == len(records)
    for request in requests:
        row = by_id[json.dumps(request.id)]
        prompt = build_chat_ids(tokenizer, family, request.query, request.history, request.role)
        assert row["prompt_tokens"] == len(prompt)
        assert row["response"] == expected_reply(model, tokenizer, settings, request), request.id
        budget = request.generation.get("max_new_tokens", 72 - len(prompt))
        # the random models never stop early: every row runs to its own budget
        assert row["completion_tokens"] == budget and row["finish_reason"] == "length"
        assert row["seconds"] > 0


def test_plain_text_input_uses_line_numbers(tmp_path):
    source = tmp_path / "prompts.txt"
    source.write_text("你好\n讲个笑话\n\n什么是机器学习\n", encoding="utf-8")
    output = str(tmp_path / "out.jsonl")
    overrides = ["generation.max_new_tokens=8"]
    result = run(["--config", TINY["chatglm3"], "--input", str(source), "--output", output,
                  "--batch-size", "2", "--set", overrides[0]])
    assert result.returncode == 0, result.stderr
    rows = {r["id"]: r for r in read_jsonl(output)}
    assert sorted(rows) == [1, 2, 4]
    model, tokenizer, settings, _ = reference_chat(TINY["chatglm3"], overrides)
    for number, query in ((1, "你好"), (2, "讲个笑话"), (4, "什么是机器学习")):
        assert rows[number]["response"] == model.chat(tokenizer, query, [], **settings)[0]


def test_strict_refuses_bad_lines_before_generating(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", MIXED[:2], [line for line, _ in BAD_LINES])
    output = tmp_path / "out.jsonl"
    result = run(["--config", TINY["chatglm3"], "--input", source, "--output", str(output), "--strict"])
    assert result.returncode == 1 and f"{len(BAD_LINES)} bad input line(s); nothing generated" in result.stderr
    for number in range(3, 3 + len(BAD_LINES)):
        assert f"{source}:{number}: " in result.stderr
    assert not output.exists()


def test_resume_after_a_killed_run_has_no_gaps_and_no_duplicates(tmp_path):
    prompts = [{"id": f"p{i}", "prompt": "晚上睡不着应该怎么办" * (i % 3 + 1) + str(i)} for i in range(8)]
    source = write_jsonl(tmp_path / "in.jsonl", prompts)
    output = tmp_path / "out.jsonl"
    overrides = ["generation.max_new_tokens=60"]
    args = ["--config", TINY["chatglm3"], "--input", source, "--output", str(output), "--batch-size", "1",
            "--set", overrides[0]]

    def start_and_stop(extra, sig, lines):
        """Start a run, send `sig` once the output has `lines` lines; (exit status, stderr)."""
        process = subprocess.Popen([sys.executable, BATCH_INFER, *args, *extra], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, cwd=REPO, env=ENV)
        try:
            deadline = time.monotonic() + 180
            while not (output.exists() and output.read_bytes().count(b"\n") >= lines):
                assert process.poll() is None and time.monotonic() < deadline, "the run ended before the signal"
                time.sleep(0.02)
            process.send_signal(sig)
            return process.wait(60), process.stderr.read().decode()
        finally:
            if process.poll() is None:
                process.kill()

    status, _ = start_and_stop([], signal.SIGKILL, 1)
    assert status == -signal.SIGKILL
    written = output.read_bytes().count(b"\n")
    assert 1 <= written < len(prompts)

    again = run(args)  # without --resume an existing output is refused
    assert again.returncode == 2 and "--resume" in again.stderr

    # Ctrl-C: the batch in flight is finished and written, then the run stops
    status, stderr = start_and_stop(["--resume"], signal.SIGINT, written + 1)
    assert status == 130 and "rerun with --resume" in stderr and "Traceback" not in stderr
    assert f"resuming: {written} of {len(prompts)}" in stderr
    written = output.read_bytes().count(b"\n")
    assert output.read_bytes().endswith(b"\n") and written < len(prompts)

    resumed = run(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {written} of {len(prompts)}" in resumed.stderr
    rows = read_jsonl(output)
    assert sorted(r["id"] for r in rows) == sorted(p["id"] for p in prompts)  # each exactly once
    model, tokenizer, settings, _ = reference_chat(TINY["chatglm3"], overrides)
    for row in rows:
        query = next(p["prompt"] for p in prompts if p["id"] == row["id"])
        assert row["response"] == model.chat(tokenizer, query, [], **settings)[0]

    done = run(args + ["--resume"])
    assert done.returncode == 0 and "nothing to do" in done.stderr
    assert len(read_jsonl(output)) == len(prompts)


def test_config_errors_are_one_line(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", MIXED[:1])
    result = run(["--config", TINY["chatglm3"], "--input", source, "--output", str(tmp_path / "o.jsonl"),
                  "--set", "generation.top_q=1"])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "generation.top_q" in result.stderr
    result = run(["--config", TINY["chatglm3"], "--input", str(tmp_path / "missing.jsonl"),
                  "--output", str(tmp_path / "o.jsonl")])
    assert result.returncode == 2 and "missing.jsonl does not exist" in result.stderr


# ---------------------------------------------------------------------------------- units
def test_messages_to_turn():
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}]
    assert messages_to_turn(messages, "chatglm2") == ("c", [["a", "b"]], "user")
    query, history, role = messages_to_turn(messages[:2] + [{"role": "observation", "content": "{}"}], "chatglm3")
    assert (query, role) == ("{}", "observation") and history == messages[:2]
    with pytest.raises(ValueError, match="alternate"):
        messages_to_turn([{"role": "system", "content": "s"}, {"role": "user", "content": "c"}], "chatglm")
    with pytest.raises(ValueError, match="last message"):
        messages_to_turn(messages[:2], "chatglm3")
    with pytest.raises(ValueError, match="non-empty list"):
        messages_to_turn([], "chatglm3")


@pytest.mark.parametrize("text, words", [
    ('[1, 2]', "JSON object"),
    ('{"id": 1.5, "prompt": "x"}', "'id'"),
    ('{"prompt": "x", "messages": []}', "exactly one"),
    ('{"prompt": ""}', "non-empty"),
    ('{"prompt": "x", "generation": {"eos_token_id": 5}}', "eos_token_id"),
    ('{"messages": [{"role": "user", "content": "x"}], "history": []}', "'history' goes with 'prompt'"),
])
def test_parse_record_errors(text, words):
    with pytest.raises(ValueError, match=words):
        parse_record(text, 3, "chatglm3", set())


def test_parse_record_defaults_the_id_to_the_line_number():
    request = parse_record('{"prompt": "x", "generation": {"top_p": 0.5}}', 9, "chatglm3", set())
    assert (request.id, request.query, request.history, request.role, request.generation) == \
        (9, "x", [], "user", {"top_p": 0.5})


def test_read_done_ids_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "a", "response": "x"}\n{"id": 2, "response": "y"}\n{"id": "c", "resp')
    assert read_done_ids(str(path)) == {'"a"', "2"}
    assert path.read_bytes().endswith(b'"y"}\n')
    path.write_text('{"id": "a"}\nnot json\n')
    with pytest.raises(batch_infer.BatchError, match="out.jsonl:2"):
        read_done_ids(str(path))
