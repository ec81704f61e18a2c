"""run_chat.py driven as a subprocess with scripted stdin on the tiny e2e models, plus the session
logic (commands, tool calls, streaming hold-back) in-process with a fake model."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import reference_chat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import run_chat  # noqa: E402
from mindglm.chat import stable_text  # noqa: E402
from run_chat import BOT_PREFIX, USER_PROMPT, ChatSession, ReplyPrinter  # noqa: E402

RUN_CHAT = os.path.join(REPO, "run_chat.py")
TINY = {family: os.path.join(REPO, "configs", "tiny", f"{family}_e2e.yaml")
        for family in ("chatglm", "chatglm2", "chatglm3")}
E2E = os.path.join(REPO, "tests", "fixtures", "chat")
ENV = {**os.environ, "GLOG_v": "3", "PYTHONIOENCODING": "utf-8"}


def run(args, stdin="", timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, RUN_CHAT, *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=ENV)


def replies(stdout: str) -> list:
    """The streamed replies, in order, as the terminal showed them."""
    return [segment.split("\n\n" + USER_PROMPT)[0] for segment in stdout.split(BOT_PREFIX)[1:]]




# ---------------------------------------------------------------------------------- subprocess
def test_streamed_replies_equal_chat_and_clear_resets_history():
    overrides = ["generation.max_new_tokens=24"]
    golden_query, golden_response = golden_first_turn("chatglm3")
    queries = ["你好", "晚上睡不着应该怎么办"]
    # no `stop` at the end: the end of stdin ends the session
    result = run(["--config", TINY["chatglm3"], "--set", overrides[0]],
                 f"{queries[0]}\n{queries[1]}\nclear\n{queries[1]}\n")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "ChatGLM3-6B" in result.stdout.splitlines()[0]
    assert "history cleared" in result.stdout

    model, tokenizer, settings = reference_chat(TINY["chatglm3"], overrides)[:3]
    first, history = model.chat(tokenizer, queries[0], [], **settings)
    second, _ = model.chat(tokenizer, queries[1], history, **settings)
    fresh, _ = model.chat(tokenizer, queries[1], [], **settings)
    assert second != fresh  # the history matters, so the check below means something
    assert replies(result.stdout) == [first, second, fresh]
    # and the in-process reference agrees with THUDM's (its golden ran to max_length 128)
    model, tokenizer, settings = reference_chat(TINY["chatglm3"])[:3]
    assert model.chat(tokenizer, golden_query, [], **settings)[0] == golden_response


def golden_first_turn(family):
    with open(os.path.join(E2E, f"{family}-e2e", "chat_golden.json"), encoding="utf-8") as handle:
        case = json.load(handle)[0]
    assert case["history"] == []
    return case["query"], case["response"]


def test_first_turn_equals_the_reference_golden():
    """ChatGLM-6B's reply post-processing rewrites text while it streams: what the terminal shows
    must still be exactly the reference reply."""
    query, response = golden_first_turn("chatglm")
    result = run(["--config", TINY["chatglm"]], f"{query}\nstop\n")
    assert result.returncode == 0, result.stderr
    assert replies(result.stdout) == [response]


def test_checkpoint_alone_infers_the_model():
    """A bare THUDM dir: family, sizes and tokenizer inferred; the reply equals the reference's."""
    query, response = golden_first_turn("chatglm2")
    directory = os.path.join(E2E, "chatglm2-e2e")
    result = run(["--checkpoint", directory, "--set", "generation.do_sample=false",
                  "--set", "generation.max_length=128"], f"{query}\nexit\n")
    assert result.returncode == 0, result.stderr
    assert "ChatGLM2-6B" in result.stdout
    assert replies(result.stdout) == [response]


def test_demo_without_arguments():
    result = run([], "你好\nstop\n")
    assert result.returncode == 0, result.stderr
    notice = result.stdout.splitlines()[0]
    assert "meaningless" in notice and "--checkpoint /path/to/chatglm3-6b" in notice and "ckpt_convert" in notice
    model, tokenizer, settings = reference_chat(TINY["chatglm3"], ["generation.max_new_tokens=48"])[:3]
    assert replies(result.stdout) == [model.chat(tokenizer, "你好", [], **settings)[0]]


class Session:
    """run_chat.py with pipes, read without blocking."""

    def __init__(self, args):
        self.process = subprocess.Popen([sys.executable, RUN_CHAT, *args], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=ENV)
        os.set_blocking(self.process.stdout.fileno(), False)
        self.output = b""

    def send(self, line: str):
        self.process.stdin.write((line + "\n").encode())
        self.process.stdin.flush()

    def wait_for(self, predicate, timeout=120):
        deadline = time.monotonic() + timeout
        while True:
            chunk = self.process.stdout.read()
            if chunk:
                self.output += chunk
            text = self.output.decode("utf-8", "replace")
            if predicate(text):
                return text
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"gave up waiting (exit {self.process.poll()}); output so far:\n{text[-2000:]}\n"
                                     f"stderr: {self.process.stderr.read().decode()[-2000:] if self.process.poll() is not None else ''}")
            time.sleep(0.05)


def test_ctrl_c_interrupts_a_reply_and_keeps_the_session():
    overrides = ["generation.max_length=400"]  # a long reply (~390 tokens) to interrupt
    session = Session(["--config", TINY["chatglm3"], "--set", overrides[0]])
    try:
        session.send("你好")
        session.wait_for(lambda text: BOT_PREFIX in text and len(text.split(BOT_PREFIX)[1]) > 10)
        session.process.send_signal(signal.SIGINT)
        session.wait_for(lambda text: "reply interrupted" in text)
        session.send("晚上睡不着应该怎么办")
        text = session.wait_for(lambda text: text.count(BOT_PREFIX) == 2 and
                                text.split(BOT_PREFIX)[2].endswith("\n\n" + USER_PROMPT))
        time.sleep(0.2)
        session.process.send_signal(signal.SIGINT)  # at the prompt: quit cleanly
        assert session.process.wait(60) == 0
        assert "Traceback" not in session.process.stderr.read().decode()
    finally:
        if session.process.poll() is None:
            session.process.kill()
    interrupted, answered = replies(text)
    assert "reply interrupted" in interrupted
    model, tokenizer, settings = reference_chat(TINY["chatglm3"], overrides)[:3]
    # the interrupted turn left no trace in the history: the next reply is a first-turn reply
    assert answered == model.chat(tokenizer, "晚上睡不着应该怎么办", [], **settings)[0]


@pytest.mark.parametrize("args, expected", [
    (["--config", "missing.yaml"], "missing.yaml does not exist"),
    (["--config", TINY["chatglm3"], "--set", "generation.top_p=2"], "generation.top_p"),
    (["--config", TINY["chatglm3"], "--set", "model.model_config.num_layers=two"], "num_layers"),
    (["--config", TINY["chatglm3"], "--device", "Ascend"], "device_target Ascend"),
    (["--config", os.path.join(REPO, "configs", "glm3", "chatglm3_6b.yaml"), "--device", "CPU",
      "--set", "model.model_config.compute_dtype=float32"], "python -m ckpt_convert --src"),
    (["--checkpoint", "missing_dir"], "python -m ckpt_convert --src"),
])
def test_bad_configuration_is_one_line_and_exit_2(args, expected):
    result = run(args, "hi\n", timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run_chat.py: error: "), result.stderr
    assert expected in lines[0]
    assert BOT_PREFIX not in result.stdout


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(f"checkpoint: {os.path.join(E2E, 'chatglm3-e2e')}\ngeneration:\n  top_q: 0.5\n")
    result = run(["--config", str(path)], timeout=120)
    assert result.returncode == 2
    assert "generation.top_q" in result.stderr and str(path) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------- in-process
class FakeModel:
    """stream_chat() yielding scripted replies; records what it was asked."""

    def __init__(self, replies):
        self.replies, self.calls = list(replies), []

    def stream_chat(self, tokenizer, query, history=None, role="user", **generation):
        self.calls.append({"query": query, "history": list(history or []), "role": role, "generation": generation})
        parts, final = self.replies.pop(0)
        for part in parts:
            yield part, history
        new_history = list(history or []) + [{"role": role, "content": query},
                                             {"role": "assistant", "metadata": "", "content": str(final)}]
        yield final, new_history


class Out:
    def __init__(self):
        self.text = ""

    def write(self, text):
        self.text += text

    def flush(self):
        pass

    def isatty(self):
        return False


def test_stable_text_holds_back_what_may_still_change():
    assert stable_text("你好[[训练", "chatglm2") == "你好"
    assert stable_text("你好,", "chatglm") == "你好"
    assert stable_text("a,b", "chatglm") == "a,b"
    assert stable_text("get_weather", "chatglm3") == ""          # may turn into a tool call
    assert stable_text("你好", "chatglm3") == "你好"
    assert stable_text("Hello there", "chatglm3") == "Hello there"


def test_reply_printer_prints_only_new_suffixes():
    out = Out()
    printer = ReplyPrinter(out, "chatglm")
    for partial in ["你", "你好,", "你好，世", "你好，世界"]:  # ChatGLM-6B's full-width rewrite
        printer.update(partial)
    printer.finish("你好，世界")
    assert out.text == "你好，世界\n"


def test_session_v3_system_tools_and_tool_calls(tmp_path):
    tools = [{"name": "get_weather", "description": "weather", "parameters": {"type": "object"}}]
    (tmp_path / "tools.json").write_text(json.dumps(tools))
    call = {"name": "get_weather", "parameters": {"city": "北京"}}
    model = FakeModel([(["get_weather"], call), (["It is ", "It is sunny"], "It is sunny")])
    out = Out()
    session = ChatSession(model, None, "chatglm3", {"max_new_tokens": 64, "eos_token_id": 2}, out=out)
    assert session.handle("/system You are helpful.")
    assert session.handle(f"/tools {tmp_path / 'tools.json'}")
    assert "loaded 1 tool(s): get_weather" in out.text
    session.handle("北京天气")
    system = {"role": "system", "content": "You are helpful.", "tools": tools}
    assert model.calls[0] == {"query": "北京天气", "history": [system], "role": "user",
                              "generation": {"max_new_tokens": 64, "truncate_history": True}}
    assert "[tool call] " + json.dumps(call, ensure_ascii=False) in out.text
    assert "get_weather[tool call]" not in out.text  # the tool name was held back, not printed as text
    assert session.prompt() != USER_PROMPT
    session.handle('{"temperature": 20}')  # the next line is the tool's result
    assert model.calls[1]["role"] == "observation" and model.calls[1]["query"] == '{"temperature": 20}'
    assert model.calls[1]["history"][0] == system and len(model.calls[1]["history"]) == 3
    assert out.text.endswith(BOT_PREFIX + "It is sunny\n")
    assert session.prompt() == USER_PROMPT and len(session.conversation.history) == 4  # no system message in it
    session.handle("clear")
    assert session.conversation.history == [] and session.conversation.system_text == "You are helpful."
    assert session.handle("stop") is False


def test_session_v2_rejects_v3_commands_and_reports_errors():
    out = Out()
    session = ChatSession(FakeModel([]), None, "chatglm2", {}, out=out)
    session.handle("/system hi")
    assert "needs a ChatGLM3 model" in out.text
    session.handle("/frobnicate")
    assert "unknown command" in out.text
    assert session.handle("   ") is True and session.handle("EXIT") is False


def test_interrupted_turn_keeps_history():
    class Interrupting(FakeModel):
        def stream_chat(self, *args, **kwargs):
            yield "partial", []
            raise KeyboardInterrupt

    out = Out()
    session = ChatSession(Interrupting([]), None, "chatglm3", {}, out=out)
    session.conversation.history = [{"role": "user", "content": "a"},
                                    {"role": "assistant", "metadata": "", "content": "b"}]
    before = list(session.conversation.history)
    session.handle("hello")
    assert session.conversation.history == before and "reply interrupted" in out.text
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_ctrl_c_is_acted_on_between_tokens():
    """The signal only sets a flag (MindSpore must not see a KeyboardInterrupt mid-compile); the
    reply stops at the next token and the turn is dropped."""
    class SignalsItself(FakeModel):
        def stream_chat(self, *args, **kwargs):
            yield "a", []
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # still inside "the model": no KeyboardInterrupt here
            yield "ab", []
            yield "abc", [("q", "abc")]

    out = Out()
    session = ChatSession(SignalsItself([]), None, "chatglm2", {}, out=out)
    session.handle("q")
    assert out.text.startswith(BOT_PREFIX + "a\n(") and "reply interrupted" in out.text
    assert session.conversation.history == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_no_room_left_under_max_length_is_said_not_generated():
    """The engine's budget rule refuses the turn (as batch_infer refuses the line); the session goes on."""
    model, tokenizer, settings = reference_chat(TINY["chatglm2"])[:3]
    out = Out()
    session = ChatSession(model, tokenizer, "chatglm2", dict(settings, max_length=8), out=out)
    session.handle("一个比八个词元更长的问题，肯定放不下")
    assert "max_length 8 leaves no room for a reply: raise max_length or set max_new_tokens" in out.text
    assert session.conversation.history == [] and model.engine.stats()["rows_in_use"] == 0


def test_a_budget_beyond_the_context_is_noted_once():
    assert run_chat.budget_notes({"max_length": 8192}, 512) == [
        "generation.max_length 8192 is capped to the model's context of 512 tokens (engine.max_model_len): "
        "prompt and reply share it"]
    assert run_chat.budget_notes({"max_length": 512}, 512) == []
    assert run_chat.budget_notes({"max_length": 8192, "max_new_tokens": 64}, 512) == []


def test_parse_args_repeatable_set():
    args = run_chat.parse_args(["--config", "x.yaml", "--set", "a=1", "--set", "b=2", "--device", "CPU"])
    assert args.overrides == ["a=1", "b=2"] and args.device == "CPU"
