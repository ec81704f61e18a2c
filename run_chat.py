#!/usr/bin/env python
"""Chat with a GLM model in the terminal: streaming replies, history, clear/stop, Ctrl-C.

    python run_chat.py                                   # the bundled tiny demo model (random weights)
    python run_chat.py --checkpoint /path/to/chatglm3-6b # a THUDM model dir: everything inferred
    python run_chat.py --config configs/glm3/chatglm3_6b.yaml --checkpoint chatglm3_6b.ckpt \\
        --device CPU --set model.model_config.compute_dtype=float32
    python run_chat.py --config ... --set generation.do_sample=false --set generation.max_length=512

In the chat:
    clear                 start a new conversation (the screen is cleared on a terminal)
    stop | exit | quit    leave (so do Ctrl-D and Ctrl-C at the prompt)
    Ctrl-C                during a reply: interrupt it; the turn is dropped, the session goes on
    /system <text>        ChatGLM3: set the system prompt (`/system` alone removes it)
    /tools <file.json>    ChatGLM3: load tool definitions (a JSON list of {name, description,
                          parameters}, or {"tools": [...]}); `/tools off` removes them
    /observation <text>   ChatGLM3: send a tool's result (JSON or text) back to the model. Right
                          after the model asks for a tool, the next line you type is the result.
    /help                 this list

Lines are read one at a time from stdin, so the chat can be scripted: `printf 'hi\\nstop\\n' |
python run_chat.py`. A configuration mistake is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys

os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only (it warns about every absent backend)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mindglm.requirements import require_packages  # noqa: E402

if __name__ == "__main__":
    require_packages(__file__)

from mindglm.chat import ChatError, stable_text  # noqa: E402
from mindglm.conversation import Conversation, load_tools  # noqa: E402
from mindglm.interrupts import InterruptFlag  # noqa: E402

USER_PROMPT = "用户："
OBSERVATION_PROMPT = "工具结果 Observation："
BOT_PREFIX = "ChatGLM："
QUIT_WORDS = ("stop", "exit", "quit")
# The system prompt THUDM's ChatGLM3 tool demo uses when tools are given without one.

HELP = """commands: clear (new conversation) | stop, exit, quit, Ctrl-D (leave) | Ctrl-C (interrupt a reply)
ChatGLM3 only: /system <text> (system prompt; alone: remove) | /tools <file.json> (tool definitions; /tools off)
              /observation <text> (a tool's result; right after a tool call the next line is the result)"""

FAMILY_NAMES = {"chatglm": "ChatGLM-6B", "chatglm2": "ChatGLM2-6B", "chatglm3": "ChatGLM3-6B"}


class UsageError(Exception):
    """Bad command-line usage: one line on stderr, exit 2."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Without --config and --checkpoint the bundled tiny demo model runs "
                                            "(meaningless replies).")
    parser.add_argument("--config", help="YAML run config (configs/...)")
    parser.add_argument("--checkpoint", help="a .ckpt (convert with `python -m ckpt_convert --src <THUDM dir> "
                        "--dst <file.ckpt>`) or a THUDM model dir; alone, a THUDM dir whose config.json, "
                        "weights and tokenizer are used")
    parser.add_argument("--adapter", metavar="DIR", help="a peft LoRA dir or a THUDM P-Tuning v2 dir to apply "
                        "(overrides the YAML's `adapter:`)")
    parser.add_argument("--device", choices=["CPU", "GPU", "Ascend"], help="override context.device_target")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. generation.top_p=0.5 (repeatable)")
    return parser.parse_args(argv)


def load_run(args):
    """(RunConfig, is_demo) from the command line."""
    from mindglm.demo import DEMO_NOTICE, REAL_WEIGHTS_HINT, demo_config
    from mindglm.yaml_config import resolve_run

    if args.config or args.checkpoint:
        return resolve_run(args.config, args.checkpoint, args.device, args.overrides, args.adapter), False
    config = demo_config()
    if config is None:
        raise UsageError("no model given and the bundled demo model is not in this checkout. " + REAL_WEIGHTS_HINT)
    print(DEMO_NOTICE, flush=True)
    # short replies so that a conversation with the demo lasts several turns
    overrides = [("generation.max_new_tokens", 48)] + args.overrides
    return resolve_run(config, None, args.device, overrides, args.adapter), True


class ReplyPrinter:
    """Prints a streamed reply incrementally: only the new suffix each time, flushed."""

    def __init__(self, out, family: str):
        self.out, self.family, self.printed = out, family, ""

    def _emit(self, text: str):
        if text.startswith(self.printed):
            new = text[len(self.printed):]
        else:  # cannot happen with the hold-back rules; never lose text if it does
            new = "\n" + text
        if new:
            self.out.write(new)
            self.out.flush()
            self.printed = text

    def update(self, response):
        if isinstance(response, str):
            self._emit(stable_text(response, self.family))

    def finish(self, response):
        if isinstance(response, str):
            self._emit(response)
            self.out.write("\n")
        else:
            if self.printed:
                self.out.write("\n")
            self.out.write("[tool call] " + json.dumps(response, ensure_ascii=False) + "\n")
        self.out.flush()


@contextlib.contextmanager
def ctrl_c_interrupts():
    """Ctrl-C while MindSpore runs the model: remembered, and acted on between two tokens.

    Two things make a plain KeyboardInterrupt a poor fit here. MindSpore's graph runtime installs
    its own SIGINT handler on every compiled-graph run (`GraphScheduler::Run` ->
    `DefaultIntHandler`), which sends the process SIGTERM; and a KeyboardInterrupt raised in the
    middle of a graph compilation makes MindSpore dump error reports (and `rank_0/om/*.ir` files).
    So during a reply both SIGINT and SIGTERM only set a flag that the reply loop checks after
    each token (a second Ctrl-C interrupts at once; an external `kill` during a reply interrupts
    the reply, at the prompt it terminates as usual). Afterwards Python's own SIGINT handler is
    put back so that Ctrl-C at the prompt quits cleanly.
    """
    interrupt = InterruptFlag()
    previous = signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    try:
        yield interrupt
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)


# ---------------------------------------------------------------------------------- the session
class ChatSession:
    """The terminal side of a chat: commands, screen output and streaming over a Conversation."""

    def __init__(self, model, tokenizer, family: str, settings: dict, out=sys.stdout):
        self.model, self.tokenizer, self.family = model, tokenizer, family
        self.settings = {k: v for k, v in settings.items() if k != "eos_token_id"}  # chat() sets stop ids
        self.out = out
        self.conversation = Conversation(family)
        # command word -> (handler taking the argument text, ChatGLM3 only?)
        self.commands = {
            "clear": (self.clear, False), "/help": (self.help, False), "help": (self.help, False),
            "/system": (self.set_system, True), "/tools": (self.set_tools, True),
            "/observation": (self.observation, True),
        }

    def welcome(self) -> str:
        name = FAMILY_NAMES[self.family]
        extra = ", /system <text>, /tools <file.json>, /observation <json>" if self.family == "chatglm3" else ""
        return (f"欢迎使用 {name} ({self.family})。Type a message and press Enter; commands: clear (new conversation), "
                f"stop (quit){extra}, /help. Ctrl-C interrupts a reply.")

    def say(self, text: str):
        self.out.write(text + "\n")
        self.out.flush()

    def prompt(self) -> str:
        return OBSERVATION_PROMPT if self.conversation.awaiting_observation else USER_PROMPT

    # ------------------------------------------------------------------ commands
    def handle(self, line: str) -> bool:
        """Act on one input line; False when the session should end."""
        text = line.strip()
        if not text:
            return True
        if text.lower() in QUIT_WORDS:
            return False
        word, _, argument = text.partition(" ")
        command = self.commands.get(word.lower())
        if command is None and text.startswith("/"):
            self.say(f"unknown command {word}; /help lists the commands")
        elif command is None or (not word.startswith("/") and argument):
            self.reply(text)  # a message (one may start with "clear" or "help")
        elif command[1] and self.family != "chatglm3":
            self.say(f"{word} needs a ChatGLM3 model; this is {FAMILY_NAMES[self.family]}")
        else:
            command[0](argument.strip())
        return True

    def clear(self, _argument: str = ""):
        self.conversation.clear()
        if self.out.isatty():
            self.out.write("\033[2J\033[H")
            self.say(self.welcome())
        else:
            self.say("(对话历史已清空 / history cleared)")

    def help(self, _argument: str = ""):
        self.say(HELP)

    def set_system(self, text: str):
        self.conversation.set_system(text)
        self.say(f"(system prompt {'set' if text else 'removed'})")

    def set_tools(self, path: str):
        if path in ("off", "none", ""):
            self.conversation.set_tools(None)
            self.say("(tools removed)" if path else "usage: /tools <file.json> | /tools off")
            return
        try:
            tools = load_tools(path)
        except ChatError as exc:
            self.say(str(exc))
            return
        self.conversation.set_tools(tools)
        names = ", ".join(str(t.get("name", "?")) for t in tools)
        self.say(f"(loaded {len(tools)} tool(s): {names})")

    def observation(self, text: str):
        if not text:
            self.say("usage: /observation <the tool's result, JSON or text>")
            return
        self.reply(text, role="observation")

    # ------------------------------------------------------------------ one turn
    def reply(self, text: str, role: str = None):
        """Stream one reply; on Ctrl-C drop the turn and keep the session."""
        from mindglm.config import ConfigError

        query, history, role = self.conversation.next_turn(text, role)
        self.out.write(BOT_PREFIX)
        self.out.flush()
        printer = ReplyPrinter(self.out, self.family)
        response = new_history = None
        try:
            with ctrl_c_interrupts() as interrupt:
                stream = self.model.stream_chat(self.tokenizer, query, history, role=role, truncate_history=True,
                                                **self.settings)
                try:
                    for response, new_history in stream:
                        if interrupt.requested:
                            raise KeyboardInterrupt
                        printer.update(response)
                finally:
                    stream.close()
        except KeyboardInterrupt:
            self.say("\n(回复已中断 / reply interrupted: this turn is not kept in the history)")
            return
        except (ChatError, ConfigError) as exc:
            self.say(f"\n(error: {exc})")
            return
        if new_history is None:
            self.say("")
            return
        printer.finish(response)
        self.conversation.finish_turn(response, new_history)
        if self.conversation.awaiting_observation:
            self.say("(the model called a tool: type its result as JSON, or /observation <json>)")


def budget_notes(settings: dict, max_model_len: int) -> list:
    """Say once, at the start, when the reply budget asked for cannot be had in full."""
    max_length = settings.get("max_length")
    if settings.get("max_new_tokens") is None and max_length is not None and max_length > max_model_len:
        return [f"generation.max_length {max_length} is capped to the model's context of {max_model_len} tokens "
                "(engine.max_model_len): prompt and reply share it"]
    return []


def read_line(prompt: str) -> str:
    """One line from stdin (EOFError at its end); the prompt goes to stdout."""
    if sys.stdin.isatty():
        return input(prompt)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="replace")
        except (AttributeError, ValueError):
            pass
    try:
        sys.stdin.reconfigure(errors="replace")
    except (AttributeError, ValueError):
        pass
    from mindglm.checkpoint import CheckpointError
    from mindglm.config import ConfigError
    from mindglm.parallel.lockstep import reports_errors, run_front_end

    try:
        run, _ = load_run(args)
        from mindglm.yaml_config import apply_context
        run.require_checkpoint()
        tokenizer = run.load_tokenizer()
        apply_context(run.context)
        from mindglm.pipeline import load_run_model
        model = load_run_model(run)
    except (ConfigError, CheckpointError, ChatError, UsageError) as exc:
        if reports_errors():  # under msrun every rank finds the same mistake: rank 0 says it once
            message = " ".join(str(exc).split())
            print(f"run_chat.py: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    # Under msrun with tensor_parallel, rank 0 chats and the other ranks follow its engine.
    return run_front_end(model, lambda: chat_loop(model, tokenizer, run)) or 0


def chat_loop(model, tokenizer, run) -> int:
    """The terminal conversation (rank 0's work under msrun)."""
    for note in run.notes + budget_notes(run.generation_settings, model.max_model_len):
        print(f"note: {note}")
    session = ChatSession(model, tokenizer, run.family, run.generation_settings)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing for input())
        except ImportError:
            pass
    session.say(session.welcome())
    while True:
        try:
            line = read_line("\n" + session.prompt())
        except (EOFError, KeyboardInterrupt):
            session.say("")
            break
        try:
            if not session.handle(line):
                break
        except KeyboardInterrupt:  # Ctrl-C outside the reply loop (e.g. while printing): keep going
            session.say("")
    return 0


if __name__ == "__main__":
    sys.exit(main())
