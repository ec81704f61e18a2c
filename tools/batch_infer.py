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

Output: JSONL, one line per prompt, in the order the batches ran:
    {"id", "response", "prompt_tokens", "completion_tokens", "finish_reason", "seconds"}
  `response` is what `model.chat(tokenizer, query, history)` returns for the line (a dict for a
  ChatGLM3 tool call); finish_reason is "stop" (a stop token) or "length" (the token budget);
  seconds is the wall time of the batch that produced the line.

Batching: prompts are built with the chat template, sorted by token length and cut into batches
of --batch-size (left-padded); lines with different `generation` overrides never share a batch.
With greedy decoding every line gets exactly the reply that `model.chat()` gives it alone. With
do_sample the rows of a batch draw from one random stream (reproducible for a given seed and
batching, but not equal to one-by-one sampling).

Robustness: a bad line (invalid JSON, no prompt, duplicate id, malformed messages, a prompt
longer than the model's context, or one that max_length leaves no room to answer; run_chat.py
refuses that turn the same way) is reported on stderr with its line number and skipped;
--strict makes any bad line an error before anything is generated (exit 1). The output is
appended and fsync'ed after every batch; --resume skips the ids already in it (an interrupted
run loses at most the batch in flight and never duplicates a line). Configuration errors are one
line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
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

import numpy as np  # noqa: E402

from mindglm.config import ConfigError  # noqa: E402
from mindglm.chat import messages_to_turn  # noqa: E402
from mindglm.interrupts import InterruptFlag  # noqa: E402

KNOWN_FIELDS = ("id", "prompt", "history", "messages", "generation")
BUDGET_KEYS = ("max_length", "max_new_tokens")


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
    budget: int = 0

    @property
    def group(self) -> str:
        """Lines whose generation overrides differ never share a batch."""
        return json.dumps(self.generation, sort_keys=True)


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


def prepare(requests: list, run, tokenizer) -> list:
    """Tokenize with the chat template and work out each line's token budget; bad lines -> (line, reason)."""
    from mindglm.chat import build_chat_ids
    from mindglm.generation.config import GenerationConfig

    context = run.model.seq_length
    bad = []
    for request in list(requests):
        try:
            config = GenerationConfig.from_kwargs(run.generation, **request.generation)
            request.ids = build_chat_ids(tokenizer, run.family, request.query, request.history, request.role)
        except (ValueError, TypeError) as exc:
            bad.append((request.line, str(exc)))
            requests.remove(request)
            continue
        length = len(request.ids)
        if length >= context:
            bad.append((request.line, f"the prompt is {length} tokens, the model's context is {context}"))
            requests.remove(request)
            continue
        # as model.chat() does: max_new_tokens wins over max_length, and the context bounds both
        request.budget = min(config.new_token_budget(length), context - length)
        if request.budget <= 0:  # run_chat says the same and does not generate either
            bad.append((request.line, f"the prompt is {length} tokens and max_length {config.max_length} leaves "
                                      "no room for a reply: raise generation.max_length or set "
                                      "generation.max_new_tokens"))
            requests.remove(request)
    return bad


def make_batches(requests: list, batch_size: int) -> list:
    """Batches of requests with equal generation overrides, similar lengths (sorted), at most batch_size."""
    groups: dict = {}
    for request in requests:
        groups.setdefault(request.group, []).append(request)
    batches = []
    for members in groups.values():
        members.sort(key=lambda r: (len(r.ids), r.line))
        batches += [members[i:i + batch_size] for i in range(0, len(members), batch_size)]
    return batches


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


class _CountingStreamer:
    """Counts generated tokens of unfinished rows while a batch runs, for the progress bar."""

    def __init__(self, batch: int, real_rows: int, stop_ids, progress: Progress):
        self.finished = np.zeros(batch, bool)
        self.real_rows = real_rows
        self.stop_ids = np.asarray(stop_ids)
        self.progress, self.count = progress, 0

    def put(self, tokens):
        tokens = np.asarray(tokens)
        self.count += int((~self.finished[:self.real_rows]).sum())
        self.finished |= np.isin(tokens, self.stop_ids)
        self.progress.draw(self.count)

    def end(self):
        pass


def run_batch(model, tokenizer, run, batch: list, progress: Progress, rows: Optional[int] = None) -> list:
    """Generate one batch; the output records, in batch order.

    `rows`: run the batch with this many rows, the missing ones filled with copies of the last
    request (their output is dropped), so that every batch has the same shape and the compiled
    graphs are reused instead of being compiled again for a short last batch.
    """
    from mindglm.chat import finish_turn, stop_token_ids

    family = run.family
    stop_ids = stop_token_ids(tokenizer, family)
    pad = run.model.pad_id
    padded = batch + [batch[-1]] * max((rows or 0) - len(batch), 0)
    length = max(len(r.ids) for r in padded)
    input_ids = np.full((len(padded), length), pad, np.int64)
    mask = np.zeros((len(padded), length), np.int64)
    for row, request in enumerate(padded):
        input_ids[row, length - len(request.ids):] = request.ids
        mask[row, length - len(request.ids):] = 1
    budget = max(r.budget for r in batch)
    settings = {k: v for k, v in batch[0].generation.items() if k not in BUDGET_KEYS}
    start = time.perf_counter()
    if budget > 0:
        output = model.generate(input_ids, attention_mask=mask, max_new_tokens=budget, eos_token_id=stop_ids,
                                streamer=_CountingStreamer(len(padded), len(batch), stop_ids, progress),
                                **settings)
    else:
        output = input_ids
    seconds = time.perf_counter() - start
    records = []
    for row, request in enumerate(batch):
        new = [int(t) for t in output[row, length:length + request.budget]]
        stops = [i for i, t in enumerate(new) if t in stop_ids]
        finish = "stop" if stops else "length"
        if stops:
            new = new[:stops[0] + 1]
        response, _ = finish_turn(tokenizer, family, request.query, request.history, new, request.role)
        records.append({"id": request.id, "response": response, "prompt_tokens": len(request.ids),
                        "completion_tokens": len(new), "finish_reason": finish, "seconds": round(seconds, 4)})
    return records


# ---------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML run config (configs/...)")
    parser.add_argument("--checkpoint", help="a .ckpt or a THUDM model dir (alone: a THUDM dir, all inferred)")
    parser.add_argument("--input", required=True, help="prompts: .jsonl (format above) or plain text, one per line")
    parser.add_argument("--output", required=True, help="JSONL answers (appended to with --resume)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per batch (default 8)")
    parser.add_argument("--resume", action="store_true", help="skip ids already in --output and append")
    parser.add_argument("--strict", action="store_true", help="any bad input line is an error (nothing is generated)")
    parser.add_argument("--device", choices=["CPU", "GPU", "Ascend"], help="override context.device_target")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. generation.max_new_tokens=256 (repeatable)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mindglm.chat import ChatError
    from mindglm.checkpoint import CheckpointError
    from mindglm.yaml_config import apply_context, resolve_run

    try:
        if args.batch_size < 1:
            raise BatchError(f"--batch-size must be at least 1, got {args.batch_size}")
        check_paths(args.input, args.output, args.resume)
        run = resolve_run(args.config, args.checkpoint, args.device, args.overrides)
        requests, bad = read_requests(args.input, run.family)
        done = read_done_ids(args.output) if args.resume else set()
        tokenizer = run.load_tokenizer()
        bad += prepare(requests, run, tokenizer)
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
    except (ConfigError, CheckpointError, ChatError, BatchError) as exc:
        print(f"batch_infer.py: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    for note in run.notes:
        print(f"note: {note}", file=sys.stderr)

    batches = make_batches(todo, args.batch_size)
    rows = max(len(batch) for batch in batches)  # one batch shape for all: compiled graphs are reused
    progress = Progress(len(todo))
    # SIGTERM too: MindSpore's graph runtime turns Ctrl-C during a graph run into SIGTERM
    interrupt = InterruptFlag("\ninterrupt: finishing the current batch (interrupt again to stop now)\n")
    signal.signal(signal.SIGTERM, interrupt)
    written = 0
    try:
        with open(args.output, "a", encoding="utf-8") as out:
            for batch in batches:
                signal.signal(signal.SIGINT, interrupt)  # MindSpore replaces it on every graph run
                records = run_batch(model, tokenizer, run, batch, progress, rows)
                out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
                out.flush()
                os.fsync(out.fileno())
                written += len(records)
                progress.rows += len(records)
                progress.tokens += sum(r["completion_tokens"] for r in records)
                progress.draw(force=True)
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
