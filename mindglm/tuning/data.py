"""Training examples as the reference trainers build them, per family.

Input: JSON lines, either ADGEN's form (`{"content": ..., "summary": ...}`, the columns named by
`prompt_column` / `response_column`, optional `history_column` of [query, response] pairs), or
ChatGLM3's conversation form (`{"conversations": [{"role", "content"}, ...]}`).

- ChatGLM-6B (THUDM ptuning/main.py): a = prompt ids (at most max_source_length - 1), b = answer
  ids (at most max_target_length - 2); ids = a + [gMASK, sop] + b + [eop]; labels are -100 up to
  sop and the ids from sop on.
- ChatGLM2-6B (THUDM ChatGLM2 ptuning/main.py): a = [gMASK, sop] + the `[Round 1]\\n\\n问：...\\n\\n答：`
  prompt, truncated to max_source_length; b = answer ids truncated to max_target_length;
  ids = a + b + [eos]; labels -100 over a.
- ChatGLM3-6B (THUDM finetune_demo/finetune_hf.py): [gMASK, sop] + per message <|role|> +
  "{metadata}\\n" + content, + eos; token i is a label when token i - 1 belongs to an assistant
  message (so each assistant turn is learnt with the role token that ends it); cut to
  max_source_length + max_target_length + 1. ADGEN lines become a user + assistant pair.

Labels are aligned with the ids (the loss shifts them, as the reference models do).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

from mindglm.chat import _v3_message_ids, build_prompt
from mindglm.config import ConfigError

IGNORE = -100


class DataError(ConfigError):
    """A training file a user must fix: the message names the file and line."""


@dataclasses.dataclass
class DataConfig:
    prompt_column: str = "content"
    response_column: str = "summary"
    history_column: Optional[str] = None
    max_source_length: int = 64
    max_target_length: int = 64
    source_prefix: str = ""


@dataclasses.dataclass
class Example:
    input_ids: list
    labels: list
    line: int


def _adgen_ids(tokenizer, family: str, query: str, answer: str, history: list, data: DataConfig) -> tuple:
    if family == "chatglm":
        a_ids = tokenizer.encode(data.source_prefix + build_prompt(family, query, history), add_special_tokens=False)
        b_ids = tokenizer.encode(answer, add_special_tokens=False)
        a_ids, b_ids = a_ids[: data.max_source_length - 1], b_ids[: data.max_target_length - 2]
        context = len(a_ids) + 1                      # the index of sop
        ids = a_ids + [tokenizer.gmask_token_id, tokenizer.sop_token_id] + b_ids + [tokenizer.eos_token_id]
        return ids, [IGNORE] * context + ids[context:]
    prompt = data.source_prefix + build_prompt("chatglm2", query, history)
    special = [tokenizer.gmask_token_id, tokenizer.sop_token_id]
    a_ids = (special + tokenizer.encode(prompt, add_special_tokens=False))[: data.max_source_length]
    b_ids = tokenizer.encode(answer, add_special_tokens=False)[: data.max_target_length]
    ids = a_ids + b_ids + [tokenizer.eos_token_id]
    return ids, [IGNORE] * len(a_ids) + b_ids + [tokenizer.eos_token_id]


def conversation_ids(tokenizer, conversation: list, data: DataConfig) -> tuple:
    """ChatGLM3's ids and labels of a list of messages (finetune_hf.py's process_batch)."""
    ids, in_assistant = [tokenizer.gmask_token_id, tokenizer.sop_token_id], [False, False]
    for message in conversation:
        part = _v3_message_ids(tokenizer, message["role"], message.get("metadata", "") or "", message["content"])
        ids += part
        in_assistant += [message["role"] == "assistant"] * len(part)
    ids.append(tokenizer.eos_token_id)
    labels = [IGNORE] + [token if previous else IGNORE for token, previous in zip(ids[1:], in_assistant)]
    cut = data.max_source_length + data.max_target_length + 1
    return ids[:cut], labels[:cut]


def _check_conversation(record, where: str) -> list:
    conversation = record.get("conversations")
    if not isinstance(conversation, list) or not conversation:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{'role', 'content'}} messages")
    for index, message in enumerate(conversation):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                or message.get("role") not in ("system", "user", "assistant", "observation"):
            raise DataError(f"{where}: conversations[{index}] must be {{'role': system|user|assistant|observation, "
                            f"'content': str}}, got {message!r}")
    return conversation


def _text(record, column: str, where: str) -> str:
    value = record.get(column)
    if not isinstance(value, str):
        have = ", ".join(sorted(record)) or "none"
        raise DataError(f"{where}: no text column '{column}' (the line has: {have}); set prompt_column / "
                        "response_column to the file's column names")
    return value


def _history(record, data: DataConfig, where: str) -> list:
    if data.history_column is None:
        return []
    history = record.get(data.history_column) or []
    if not isinstance(history, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 and
                                                all(isinstance(t, str) for t in p) for p in history):
        raise DataError(f"{where}: '{data.history_column}' must be a list of [query, response] pairs")
    return [tuple(p) for p in history]


def encode_record(tokenizer, family: str, record, data: DataConfig, where: str) -> tuple:
    """(ids, labels) of one JSON record, as the family's reference trainer builds them."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        if family != "chatglm3":
            raise DataError(f"{where}: the conversations form is ChatGLM3's; for {family} use "
                            f"'{data.prompt_column}' / '{data.response_column}' columns")
        return conversation_ids(tokenizer, _check_conversation(record, where), data)
    query, answer = _text(record, data.prompt_column, where), _text(record, data.response_column, where)
    history = _history(record, data, where)
    if family == "chatglm3":
        messages = []
        for old_query, response in history:
            messages += [{"role": "user", "content": old_query}, {"role": "assistant", "content": response}]
        messages += [{"role": "user", "content": data.source_prefix + query}, {"role": "assistant", "content": answer}]
        return conversation_ids(tokenizer, messages, data)
    return _adgen_ids(tokenizer, family, query, answer, history, data)


def json_lines(path: str):
    """(line number, "path:line", record) for every non-blank line of a JSON-lines file; an
    unreadable file or a line that is not JSON is a DataError naming it."""
    try:
        handle = open(path, encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not a JSON object ({exc.msg})") from None
            yield number, where, record


def read_examples(path: str, tokenizer, family: str, data: DataConfig) -> list:
    """Every line of a JSON-lines file as an Example; the first bad line is a DataError naming it."""
    examples = []
    for number, where, record in json_lines(path):
        ids, labels = encode_record(tokenizer, family, record, data, where)
        if all(label == IGNORE for label in labels[1:]):
            raise DataError(f"{where}: no token is left to learn after truncation (max_source_length="
                            f"{data.max_source_length}, max_target_length={data.max_target_length}): raise "
                            "them or shorten the line")
        examples.append(Example(ids, labels, number))
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples
