#!/usr/bin/env python
"""Batch chat inference from a file of prompts, YAML-configured, resumable.

    python tools/batch_infer.py --config configs/glm3/chatglm3_6b.yaml --checkpoint chatglm3_6b.ckpt \\
        --input prompts.jsonl --output answers.jsonl [--batch-size 8] [--resume] [--strict] \\
        [--device CPU --set model.model_config.compute_dtype=float32] [--set generation.do_sample=false ...]
    python tools/batch_infer.py --checkpoint /path/to/chatglm3-6b --input prompts.txt --output answers.jsonl

Input
  *.jsonl: one JSON object a line, either
    {"id": "q1", "prompt": "你好", "history": [...]?, "generation": {...}?}
        `history` in the family's own format (as `model.chat()` takes it: [query, response]
        pairs for ChatGLM-6B/ChatGLM2-6B, {role, content} messages for ChatGLM3), or
    {"id": "q2", "messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...},
                              ..., {"role": "user", "content": "the query"}], "generation": {...}?}
        the conversation so far and, last, the query (role "user"; ChatGLM3 also "observation"
        for a tool result). ChatGLM3 messages may be "system" (with optional "tools") and carry
        "metadata"; for ChatGLM-6B/2 the earlier messages are user/assistant pairs.
    `id` (a string or an integer) defaults to the line number; `generation` overrides
    GenerationConfig fields for that line (max_length, max_new_tokens, do_sample, top_p, top_k,
    temperature, repetition_penalty, seed). Unknown fields are ignored (with a warning).
  any other file: one prompt per line (blank lines skipped), id = the line number.
  Both are UTF-8; a byte order mark at the start (as Windows editors write) is skipped.

Output: JSONL, one line per prompt, in the order they finish:
    {"id", "response", "prompt_tokens", "completion_tokens", "finish_reason", "seconds"}
  `response` is what `model.chat(tokenizer, query, history)` returns for the line (a dict for a
  ChatGLM3 tool call); finish_reason is "stop" (a stop token), "tool_calls" (ChatGLM3's
  <|observation|>) or "length" (the token budget); seconds is the line's time in the engine.

Batching is continuous: up to --batch-size lines run in the engine at once, each with its own
budget and generation settings, and a line that finishes hands its row to the next one at once.
Every line gets exactly the reply that `model.chat()` gives it alone, sampled ones included
(each line has its own random stream, seeded by its `seed`).

Robustness: a bad line (invalid JSON, no prompt, duplicate id, malformed messages, a prompt
longer than the model's context, or one that max_length leaves no room to answer; run_chat.py
refuses that turn the same way) is reported on stderr with its line number and skipped;
--strict makes any bad line an error before anything is generated (exit 1). The output is
appended and fsync'ed as lines finish; --resume skips the ids already in it (an interrupted
run loses at most the lines in flight and never duplicates a line). Configuration errors are one
line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional

os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mindglm.requirements import require_packages  # noqa: E402

if __name__ == "__main__":
    require_packages(__file__)

from mindglm.config import ConfigError  # noqa: E402
from mindglm.chat import messages_to_turn  # noqa: E402
from mindglm.interrupts import InterruptFlag  # noqa: E402

KNOWN_FIELDS = ("id", "prompt", "history", "messages", "generation")


class BatchError(Exception):
    """A usage error of the tool: one line on stderr, exit 2."""


@dataclass
class Request:
    """One input line, parsed (and later tokenized)."""

    line: int
    id: Any
    query: str
    history: list
    role: str = "user"
    generation: dict = field(default_factory=dict)
    ids: Optional[list] = None
    config: Any = None          # its GenerationConfig


def id_key(value) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


# ---------------------------------------------------------------------------------- input
def parse_record(text: str, line: int, family: str, warned: set) -> Request:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON at column {exc.colno}: {exc.msg}") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(KNOWN_FIELDS) - warned)
    if unknown:
        warned.update(unknown)
        print(f"warning: ignoring unknown field(s) {unknown} (known: {', '.join(KNOWN_FIELDS)})", file=sys.stderr)
    identifier = record.get("id", line)
    if isinstance(identifier, bool) or not isinstance(identifier, (str, int)):
        raise ValueError(f"'id' must be a string or an integer, got {identifier!r}")
    if ("prompt" in record) == ("messages" in record):
        raise ValueError("needs exactly one of 'prompt' (a string) or 'messages' (a list)")
    if "prompt" in record:
        query = record["prompt"]
        if not isinstance(query, str) or not query.strip():
            raise ValueError("'prompt' must be a non-empty string")
        history = record.get("history") or []
        if not isinstance(history, list):
            raise ValueError("'history' must be a list")
        role = "user"
    else:
        if "history" in record:
            raise ValueError("'history' goes with 'prompt'; with 'messages' put the history in the messages")
        query, history, role = messages_to_turn(record["messages"], family)
    generation = record.get("generation") or {}
    if not isinstance(generation, dict):
        raise ValueError("'generation' must be an object of generation settings")
    if "eos_token_id" in generation or "pad_token_id" in generation:
        raise ValueError("'generation' cannot set eos_token_id/pad_token_id: the chat template decides them")
    return Request(line, identifier, query, history, role, generation)


def check_paths(input_path: str, output_path: str, resume: bool) -> None:
    """Fail before the model loads: the input must be a readable file, the output a file that can
    be created (or, with --resume, appended to) in an existing, writable directory."""
    if os.path.isdir(input_path):
        raise BatchError(f"--input {input_path} is a directory: pass a file of prompts (.jsonl or text)")
    if not os.path.isfile(input_path):
        raise BatchError(f"input file {input_path} does not exist")
    if os.path.isdir(output_path):
        raise BatchError(f"--output {output_path} is a directory: pass a file name, e.g. "
                         f"{os.path.join(output_path, 'answers.jsonl')}")
    if os.path.exists(output_path) and os.path.getsize(output_path) and not resume:
        raise BatchError(f"{output_path} already exists: pass --resume to skip the ids in it and append, "
                         "or remove it")
    folder = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(folder):
        raise BatchError(f"the directory of --output {output_path} does not exist: create {folder} first")
    try:  # trying is the only reliable test: root ignores permission bits, a read-only mount does not
        if os.path.exists(output_path):
            open(output_path, "a", encoding="utf-8").close()
        else:  # leave nothing behind if the run stops before its first answer
            tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise BatchError(f"cannot write --output {output_path} ({exc.strerror}): pass a path in a directory "
                         "you can write to") from None


def read_requests(path: str, family: str) -> tuple:
    """(requests, bad) where bad is a list of (line, reason). A UTF-8 byte order mark is skipped."""
    if not os.path.isfile(path):
        raise BatchError(f"input file {path} does not exist")
    jsonl = path.endswith(".jsonl")
    requests, bad, seen, warned = [], [], {}, set()
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        for number, text in enumerate(handle, start=1):
            text = text.rstrip("\n").rstrip("\r")
            if not text.strip():
                continue
            try:
                request = parse_record(text, number, family, warned) if jsonl else Request(number, number, text, [])
            except ValueError as exc:
                bad.append((number, str(exc)))
                continue
            key = id_key(request.id)
            if key in seen:
                bad.append((number, f"duplicate id {request.id!r} (first on line {seen[key]})"))
                continue
            seen[key] = number
            requests.append(request)
    return requests, bad


def prepare(requests: list, run, tokenizer, max_model_len: int) -> list:
    """Tokenize with the chat template and check each line's budget fits; bad lines -> (line, reason)."""
    from mindglm.chat import build_chat_ids
    from mindglm.engine import token_budget
    from mindglm.generation.config import GenerationConfig

    bad = []
    for request in list(requests):
        try:
            request.config = GenerationConfig.from_kwargs(run.generation, **request.generation)
            request.ids = build_chat_ids(tokenizer, run.family, request.query, request.history, request.role)
            token_budget(request.config, len(request.ids), max_model_len)
        except (ValueError, TypeError) as exc:
            bad.append((request.line, " ".join(str(exc).split())))
            requests.remove(request)
    return bad


# ---------------------------------------------------------------------------------- output
def read_done_ids(path: str) -> set:
    """Ids already written to `path`; a torn last line (a killed run) is cut off."""
    done = set()
    if not os.path.exists(path):
        return done
    with open(path, "rb") as handle:
        data = handle.read()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        print(f"{path}: dropping an incomplete last line ({len(data) - keep} bytes) left by an interrupted run",
              file=sys.stderr)
        with open(path, "r+b") as handle:
            handle.truncate(keep)
    for number, raw in enumerate(data[:keep].splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            done.add(id_key(record["id"]))
        except (ValueError, KeyError, TypeError):
            raise BatchError(f"{path}:{number} is not an output line of this tool (no JSON object with an 'id'); "
                             "fix or remove the file") from None
    return done


class Progress:
    """A one-line progress bar on stderr: rows done, tokens, tokens/s; redrawn with \\r."""

    def __init__(self, total_rows: int, stream=sys.stderr, width: int = 24):
        self.total, self.stream, self.width = total_rows, stream, width
        self.rows = self.tokens = 0
        self.start = time.perf_counter()
        self.last_draw = 0.0

    def draw(self, live_tokens: int = 0, force: bool = False):
        now = time.perf_counter()
        if not force and now - self.last_draw < 0.2:
            return
        self.last_draw = now
        elapsed = max(now - self.start, 1e-9)
        tokens = self.tokens + live_tokens
        filled = int(self.width * self.rows / self.total) if self.total else self.width
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r[{bar}] {self.rows}/{self.total} rows | {tokens} tokens | "
                          f"{tokens / elapsed:.1f} tok/s | {elapsed:.0f}s ")
        self.stream.flush()


def record_of(seq, request: Request, tokenizer, family: str) -> dict:
    """The output line of a finished sequence."""
    from mindglm.chat import finish_turn

    response, _ = finish_turn(tokenizer, family, request.query, request.history, seq.output_ids, request.role)
    return {"id": request.id, "response": response, "prompt_tokens": len(request.ids),
            "completion_tokens": len(seq.output_ids), "finish_reason": seq.finish_reason,
            "seconds": round(seq.finish_time - seq.arrival_time, 4)}


def run_lines(model, tokenizer, family: str, todo: list, write, progress: Progress, interrupt) -> None:
    """Feed the engine continuously: up to max_num_seqs lines at once, the next one added as soon
    as a row frees up; `write(records)` gets each step's finished lines. An interrupt stops the
    feeding and lets the lines in flight finish."""
    from mindglm.chat import stop_token_ids, tool_call_token_ids

    engine = model.engine
    stop_ids, tool_ids = stop_token_ids(tokenizer, family), tool_call_token_ids(tokenizer, family)
    pending, running = list(reversed(todo)), {}
    while pending or running:
        while pending and len(running) < engine.engine_config.max_num_seqs and not interrupt.requested:
            request = pending.pop()
            seq = engine.add_request(request.ids, request.config, stop_ids=stop_ids, tool_call_ids=tool_ids)
            running[seq.request_id] = (seq, request)
        if not running:
            return
        engine.step()
        finished = [item for item in running.values() if item[0].finished]
        for seq, _ in finished:
            del running[seq.request_id]
        if finished:
            write([record_of(seq, request, tokenizer, family) for seq, request in finished])
        progress.draw(sum(len(seq.output_ids) for seq, _ in running.values()))


# ---------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML run config (configs/...)")
    parser.add_argument("--checkpoint", help="a .ckpt or a THUDM model dir (alone: a THUDM dir, all inferred)")
    parser.add_argument("--input", required=True, help="prompts: .jsonl (format above) or plain text, one per line")
    parser.add_argument("--output", required=True, help="JSONL answers (appended to with --resume)")
    parser.add_argument("--batch-size", type=int, default=8, help="lines generated at once (default 8)")
    parser.add_argument("--resume", action="store_true", help="skip ids already in --output and append")
    parser.add_argument("--strict", action="store_true", help="any bad input line is an error (nothing is generated)")
    parser.add_argument("--adapter", metavar="DIR", help="a peft LoRA dir or a THUDM P-Tuning v2 dir to apply "
                        "(overrides the YAML's `adapter:`)")
    parser.add_argument("--device", choices=["CPU", "GPU", "Ascend"], help="override context.device_target")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. generation.max_new_tokens=256 (repeatable)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mindglm.chat import ChatError
    from mindglm.checkpoint import CheckpointError
    from mindglm.parallel.lockstep import reports_errors, run_front_end
    from mindglm.yaml_config import apply_context, resolve_run

    try:
        if args.batch_size < 1:
            raise BatchError(f"--batch-size must be at least 1, got {args.batch_size}")
        check_paths(args.input, args.output, args.resume)
        run = resolve_run(args.config, args.checkpoint, args.device, args.overrides, args.adapter)
        requests, bad = read_requests(args.input, run.family)
        done = read_done_ids(args.output) if args.resume else set()
        tokenizer = run.load_tokenizer()
        engine_config = dataclasses.replace(run.engine, max_num_seqs=args.batch_size)
        bad += prepare(requests, run, tokenizer, engine_config.model_len(run.model.seq_length))
        for line, reason in sorted(bad):
            print(f"{args.input}:{line}: {reason}; skipped", file=sys.stderr)
        if bad and args.strict:
            print(f"{len(bad)} bad input line(s); nothing generated (--strict)", file=sys.stderr)
            return 1
        todo = [r for r in requests if id_key(r.id) not in done]
        if done:
            print(f"resuming: {len(requests) - len(todo)} of {len(requests)} id(s) already in {args.output}",
                  file=sys.stderr)
        if not todo:
            print("nothing to do", file=sys.stderr)
            return 0
        apply_context(run.context)
        run.require_checkpoint()
        from mindglm.pipeline import load_run_model
        model = load_run_model(run)
        model.engine_config = engine_config
    except (ConfigError, CheckpointError, ChatError, BatchError) as exc:
        if reports_errors():  # under msrun every rank finds the same mistake: rank 0 says it once
            print(f"batch_infer.py: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    # Under msrun with tensor_parallel, rank 0 reads and writes the files and the other ranks
    # follow its engine. Every rank read the input (and --output for --resume) above, before the
    # model's start joined them: rank 0 writes nothing until then, so they all saw the same lines.
    return run_front_end(model, lambda: generate_lines(args, run, model, tokenizer, todo, bad)) or 0


def generate_lines(args, run, model, tokenizer, todo, bad) -> int:
    """Generate `todo` into --output with a progress bar (rank 0's work under msrun)."""
    from mindglm.chat import ChatError
    for note in run.notes:
        print(f"note: {note}", file=sys.stderr)

    progress = Progress(len(todo))
    # SIGTERM too: MindSpore's graph runtime turns Ctrl-C during a graph run into SIGTERM
    interrupt = InterruptFlag("\ninterrupt: finishing the lines in flight (interrupt again to stop now)\n")
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    written = 0
    try:
        with open(args.output, "a", encoding="utf-8") as out:
            def write(records):
                nonlocal written
                out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
                out.flush()
                os.fsync(out.fileno())
                written += len(records)
                progress.rows += len(records)
                progress.tokens += sum(r["completion_tokens"] for r in records)
                progress.draw(force=True)
                signal.signal(signal.SIGINT, interrupt)  # MindSpore replaces it on graph runs

            run_lines(model, tokenizer, run.family, todo, write, progress, interrupt)
        if interrupt.requested:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        print(f"\ninterrupted: {written} line(s) written to {args.output}; rerun with --resume to continue",
              file=sys.stderr)
        return 130
    except (ConfigError, ChatError) as exc:
        print(f"\nbatch_infer.py: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - progress.start
    print(f"\ndone: {written} line(s), {progress.tokens} generated tokens in {elapsed:.1f}s "
          f"({progress.tokens / max(elapsed, 1e-9):.1f} tok/s) -> {args.output}"
          + (f"; {len(bad)} bad line(s) skipped" if bad else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
