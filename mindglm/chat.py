"""Chat prompts, response post-processing and tool calls, one set of rules per GLM family.

A chat turn, as THUDM's `model.chat()` does it, is:

    ids = build_chat_ids(tokenizer, family, query, history, role)      # prompt token ids
    new_ids = <generate from ids, stopping at stop_token_ids(tokenizer, family)>
    response, history = finish_turn(tokenizer, family, query, history, new_ids, role)

`finish_turn` is `decode_reply` + `process_response` + `update_history`; streaming front ends
use `StreamDecoder` to get the reply text so far without broken multi-byte characters.

History formats (as the reference `chat()` takes and returns them):
- ChatGLM-6B / ChatGLM2-6B: a list of (query, response) pairs (tuples or lists).
- ChatGLM3-6B: a list of messages `{"role", "content", "metadata"?, "tools"?}` with role one of
  system / user / assistant / observation; a system message may carry `tools` (a JSON-able
  list), and a tool's result is fed back as a turn with `role="observation"`.

Nothing here knows about models or MindSpore.
"""
from __future__ import annotations

import ast
import copy
import json
import numbers
import re
from typing import Iterable, Optional, Sequence, Union

from mindglm.config import FAMILIES
from mindglm.tokenization import GLMTokenizer

V3_ROLES = ("system", "user", "assistant", "observation")
TRAINING_TIME_PLACEHOLDER = "[[训练时间]]"
TRAINING_TIME = "2023年"
# ChatGLM3's demos open a tool-using conversation with this system text.
TOOL_SYSTEM_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"
_V1_CHANGING = ",!:;?"  # ChatGLM-6B turns these full-width once a CJK character follows

# ChatGLM-6B turns ASCII punctuation next to a CJK ideograph into its full-width form.
_HALF_TO_FULL_WIDTH = {",": "，", "!": "！", ":": "：", ";": "；", "?": "？"}
_PUNCTUATION_NEXT_TO_CJK = re.compile(r"(?<=[\u4e00-\u9fff])[,!:;?]|[,!:;?](?=[\u4e00-\u9fff])")


class ChatError(ValueError):
    """A chat input a user can fix (history format, role, family): the message says how."""


def _check_family(family: str, tokenizer: Optional[GLMTokenizer] = None) -> str:
    if family is None and tokenizer is not None:
        family = tokenizer.family
    if family not in FAMILIES:
        raise ChatError(f"unknown chat family {family!r}; expected one of {FAMILIES}")
    if tokenizer is not None and tokenizer.family != family:
        raise ChatError(f"a {tokenizer.family} tokenizer cannot build {family} prompts: "
                        f"load the tokenizer with family={family!r}")
    return family


def _check_pairs(history: Sequence) -> list:
    pairs = []
    for index, turn in enumerate(history):
        if not isinstance(turn, (list, tuple)) or len(turn) != 2 or not all(isinstance(t, str) for t in turn):
            raise ChatError(f"history[{index}] should be a (query, response) pair of strings for "
                            f"ChatGLM-6B/ChatGLM2-6B, got {turn!r}")
        pairs.append(tuple(turn))
    return pairs


def _check_messages(history: Sequence) -> list:
    for index, message in enumerate(history):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ChatError(f"history[{index}] should be a ChatGLM3 message "
                            f"{{'role': ..., 'content': str, 'metadata'?: str}}, got {message!r}")
        if message.get("role") not in V3_ROLES:
            raise ChatError(f"history[{index}] has role {message.get('role')!r}; expected one of {V3_ROLES}")
        if not isinstance(message.get("metadata", ""), str):
            raise ChatError(f"history[{index}]['metadata'] should be a string, got {message['metadata']!r}")
    return list(history)


def build_prompt(family: str, query: str, history: Optional[Sequence] = None) -> str:
    """The text prompt of ChatGLM-6B (`[Round i]\\n问：…\\n答：…\\n`, 0-based, the bare query when
    there is no history) or ChatGLM2-6B (`[Round i]\\n\\n问：…\\n\\n答：…\\n\\n`, 1-based)."""
    family = _check_family(family)
    pairs = _check_pairs(history or [])
    if family == "chatglm":
        if not pairs:
            return query
        rounds = [f"[Round {i}]\n问：{old_query}\n答：{response}\n" for i, (old_query, response) in enumerate(pairs)]
        return "".join(rounds) + f"[Round {len(pairs)}]\n问：{query}\n答："
    if family == "chatglm2":
        rounds = [f"[Round {i}]\n\n问：{old_query}\n\n答：{response}\n\n"
                  for i, (old_query, response) in enumerate(pairs, start=1)]
        return "".join(rounds) + f"[Round {len(pairs) + 1}]\n\n问：{query}\n\n答："
    raise ChatError("ChatGLM3 prompts contain role tokens, not text: use build_chat_ids()")


def _v3_message_ids(tokenizer, role: str, metadata: str, content: str) -> list:
    # <|role|> + "{metadata}\n" + content, each part encoded on its own as the reference does.
    return ([tokenizer.role_token_id(role)] + tokenizer.encode_plain(f"{metadata}\n")
            + tokenizer.encode_plain(content))


def build_chat_ids(tokenizer: GLMTokenizer, family: Optional[str], query: str,
                   history: Optional[Sequence] = None, role: str = "user") -> list:
    """Token ids of the full chat prompt for `query` after `history`, as the reference `chat()` builds
    them (special prefix/suffix included). `role` is ChatGLM3 only: "user", or "observation" to
    feed back a tool result (or "system"/"assistant"); `family=None` means the tokenizer's family."""
    family = _check_family(family, tokenizer)
    if family != "chatglm3":
        if role != "user":
            raise ChatError(f"{family} chats have only user turns; role={role!r} is ChatGLM3 only")
        return tokenizer.encode(build_prompt(family, query, history), add_special_tokens=True)
    if role not in V3_ROLES:
        raise ChatError(f"unknown ChatGLM3 role {role!r}; expected one of {V3_ROLES}")
    ids = [tokenizer.gmask_token_id, tokenizer.sop_token_id]
    for message in _check_messages(history or []):
        content = message["content"]
        if message["role"] == "system" and "tools" in message:
            content = content + "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
        ids += _v3_message_ids(tokenizer, message["role"], message.get("metadata", ""), content)
    ids += _v3_message_ids(tokenizer, role, "", query)
    return ids + [tokenizer.role_token_id("assistant")]


def stop_token_ids(tokenizer: GLMTokenizer, family: Optional[str] = None) -> list:
    """Ids that end a reply: eos (`<eop>` for ChatGLM-6B), plus `<|user|>` and `<|observation|>`
    for ChatGLM3 (the model hands the turn back to the user or asks for a tool result)."""
    family = _check_family(family, tokenizer)
    if family == "chatglm3":
        return [tokenizer.eos_token_id, tokenizer.role_token_id("user"), tokenizer.role_token_id("observation")]
    return [tokenizer.eos_token_id]


def tool_call_token_ids(tokenizer: GLMTokenizer, family: Optional[str] = None) -> list:
    """The stop ids that mean "call a tool": ChatGLM3's `<|observation|>`; none elsewhere."""
    family = _check_family(family, tokenizer)
    return [tokenizer.role_token_id("observation")] if family == "chatglm3" else []


def decode_reply(tokenizer: GLMTokenizer, family: Optional[str], new_ids: Iterable[int]) -> str:
    """Text of the generated ids, without the stop token that ended them.

    The ChatGLM3 reference drops the last generated token unconditionally, which cuts a reply
    that ran into max_length; here it is dropped only when it is a stop token.
    """
    family = _check_family(family, tokenizer)
    new_ids = [int(i) for i in new_ids]
    if new_ids and new_ids[-1] in stop_token_ids(tokenizer, family):
        new_ids = new_ids[:-1]
    return tokenizer.decode(new_ids)


def _normalise_v1(text: str) -> str:
    text = text.strip().replace(TRAINING_TIME_PLACEHOLDER, TRAINING_TIME)
    return _PUNCTUATION_NEXT_TO_CJK.sub(lambda m: _HALF_TO_FULL_WIDTH[m.group()], text)


def _split_v3_output(output: str) -> list:
    """(metadata, content) for each `<|assistant|>` segment, as the reference splits them."""
    segments = []
    for segment in output.split("<|assistant|>"):
        metadata, content = segment.split("\n", maxsplit=1) if "\n" in segment else ("", segment)
        if not metadata.strip():
            content = content.strip()
        segments.append((metadata, content))
    return segments


def parse_tool_call(code: str) -> Optional[dict]:
    """Arguments of a ChatGLM3 tool call `tool_call(a=1, b="x")` as a dict, or None if `code` is not
    exactly one such call with literal keyword arguments (a dict literal is accepted too).

    Parsed with `ast`, never evaluated: names, attribute access, calls inside the arguments,
    positional or `**` arguments are all rejected."""
    try:
        tree = ast.parse(code.strip(), mode="eval").body
        if isinstance(tree, ast.Dict):
            value = ast.literal_eval(tree)
            return value if isinstance(value, dict) else None
        if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.func.id == "tool_call"):
            return None
        if tree.args or any(keyword.arg is None for keyword in tree.keywords):
            return None
        names = [keyword.arg for keyword in tree.keywords]
        if len(set(names)) != len(names):
            return None
        return {keyword.arg: ast.literal_eval(keyword.value) for keyword in tree.keywords}
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return None


def _tool_call_parameters(content: str) -> Optional[dict]:
    # The reference drops the first and last lines (the ``` fences) and evaluates the rest; a
    # fence-less or oddly fenced call is tried as a whole before giving up.
    parameters = parse_tool_call("\n".join(content.split("\n")[1:-1]))
    if parameters is None:
        lines = content.strip().split("\n")
        if lines and lines[0].startswith("```"):
            lines = lines[1:]
        if lines and lines[-1].strip().startswith("```"):
            lines = lines[:-1]
        parameters = parse_tool_call("\n".join(lines))
    return parameters


def _has_tools(history: Sequence) -> bool:
    return bool(history) and isinstance(history[0], dict) and history[0].get("role") == "system" \
        and "tools" in history[0]


def process_response(family: str, output: str, history: Optional[Sequence] = None) -> Union[str, dict]:
    """The reply the user sees, from the decoded model output, as the reference post-processes it.

    - ChatGLM-6B: strip, `[[训练时间]]` -> `2023年`, ASCII `, ! : ; ?` next to a CJK ideograph
      become full-width.
    - ChatGLM2-6B: strip and `[[训练时间]]` only.
    - ChatGLM3-6B: the last `<|assistant|>` segment; its first line is metadata. Empty metadata:
      the stripped text. Metadata with tools in the conversation (`history[0]` a system message
      with `tools`): `{"name": metadata, "parameters": {...}}` parsed safely (a malformed call is
      returned as its text, never executed). Metadata without tools: `{"name": ..., "content": ...}`.
    `history` is the conversation before this turn (ChatGLM3 looks only at its first message).
    """
    family = _check_family(family)
    if family == "chatglm":
        return _normalise_v1(output)
    if family == "chatglm2":
        return output.strip().replace(TRAINING_TIME_PLACEHOLDER, TRAINING_TIME)
    metadata, content = _split_v3_output(output)[-1]
    if not metadata.strip():
        return content.replace(TRAINING_TIME_PLACEHOLDER, TRAINING_TIME)
    if not _has_tools(history or []):
        return {"name": metadata.strip(), "content": content}
    parameters = _tool_call_parameters(content)
    if parameters is None:
        return content.strip()
    return {"name": metadata.strip(), "parameters": parameters}


def update_history(family: str, history: Optional[Sequence], query: str, output: str,
                   role: str = "user") -> list:
    """The history after this turn, as the reference `chat()` returns it; `history` is not modified.

    `output` is the decoded model output (before `process_response`). ChatGLM-6B/2: the old pairs
    plus `(query, process_response(output))`. ChatGLM3: the old messages plus
    `{"role": role, "content": query}` and one `{"role": "assistant", "metadata", "content"}` per
    `<|assistant|>` segment of the output (content stripped unless it is a tool call)."""
    family = _check_family(family)
    if family != "chatglm3":
        _check_pairs(history or [])
        return list(history or []) + [(query, process_response(family, output))]
    messages = copy.deepcopy(_check_messages(history or []))
    messages.append({"role": role, "content": query})
    for metadata, content in _split_v3_output(output):
        messages.append({"role": "assistant", "metadata": metadata, "content": content})
    return messages


def drop_oldest_turn(family: str, history: Sequence) -> Optional[list]:
    """History without its oldest exchange (a v3 system message stays), or None when empty."""
    history = list(history)
    if family != "chatglm3":
        return history[1:] if history else None
    start = 1 if history and history[0].get("role") == "system" else 0
    if start >= len(history):
        return None
    end = start + 1
    while end < len(history) and history[end].get("role") != "user":
        end += 1
    return history[:start] + history[end:]


def finish_turn(tokenizer: GLMTokenizer, family: Optional[str], query: str, history: Optional[Sequence],
                new_ids: Iterable[int], role: str = "user") -> tuple:
    """`(response, new_history)` from the generated ids of one turn: the tail of the reference `chat()`."""
    family = _check_family(family, tokenizer)
    output = decode_reply(tokenizer, family, new_ids)
    return process_response(family, output, history), update_history(family, history, query, output, role)


def decode_stream_text(tokenizer: GLMTokenizer, ids: Iterable[int], family: Optional[str] = None) -> Optional[str]:
    """Reply text of the ids generated so far, or None while it is empty or ends inside a
    multi-byte character (U+FFFD), like the reference `stream_chat` (which then yields nothing)."""
    text = decode_reply(tokenizer, family, ids)
    return text if text and text[-1] != "\ufffd" else None


class StreamDecoder:
    """Incremental view of a reply while it is generated.

    `push(ids)` adds new token ids and returns the whole reply text so far, or None when there is
    nothing complete to show yet (empty, or ending inside a multi-byte character). Only the tail
    since the last complete text is decoded again, anchored on the tokens just before it so that
    sentencepiece's leading-space rule treats it as inside the text: a reply costs O(n), not
    O(n^2), and the text equals `decode_reply` of the same ids.
    """

    ANCHOR = 4  # tokens decoded again before the new ones, for context

    def __init__(self, tokenizer: GLMTokenizer, family: Optional[str] = None):
        self.tokenizer = tokenizer
        self.family = _check_family(family, tokenizer)
        self.ids: list = []
        self._stop_ids = set(stop_token_ids(tokenizer, self.family))
        self._text = ""          # text of ids[:self._done]
        self._done = 0

    def push(self, new_ids: Union[int, Iterable[int]]) -> Optional[str]:
        """Add generated ids (one id or several); the reply text so far, or None if incomplete."""
        if isinstance(new_ids, numbers.Integral):
            self.ids.append(int(new_ids))
        else:
            self.ids.extend(int(i) for i in new_ids)
        end = len(self.ids)
        if end and self.ids[-1] in self._stop_ids:
            end -= 1                                   # decode_reply drops a final stop token
        anchor = max(self._done - self.ANCHOR, 0)
        before = self.tokenizer.decode(self.ids[anchor:self._done]) if self._done > anchor else ""
        after = self.tokenizer.decode(self.ids[anchor:end])
        if not after.startswith(before):
            text = self.tokenizer.decode(self.ids[:end])   # the tail rewrote its context: decode all
        else:
            text = self._text + after[len(before):]
        if not text or text[-1] == "\ufffd":
            return None
        self._text, self._done = text, end
        return text


def system_messages(system_text: Optional[str] = None, tools: Optional[list] = None) -> list:
    """ChatGLM3's opening system message for a system text and/or tool definitions ([] for none);
    with tools and no text, the tool prompt of THUDM's demos."""
    if system_text is None and tools is None:
        return []
    message = {"role": "system", "content": system_text if system_text is not None else TOOL_SYSTEM_PROMPT}
    if tools is not None:
        message["tools"] = tools
    return [message]


def messages_to_turn(messages, family: str) -> tuple:
    """(query, history, role) from an OpenAI-style message list whose last message is the query.

    Raises ValueError (naming the message) for a list the family cannot take."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {role, content} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                or not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{index}] must be an object with string 'role' and 'content'")
    last = messages[-1]
    roles = ("user", "observation") if family == "chatglm3" else ("user",)
    if last["role"] not in roles:
        raise ValueError(f"the last message is the query: its role must be {' or '.join(roles)}, "
                         f"got {last['role']!r}")
    earlier = messages[:-1]
    if family == "chatglm3":
        return last["content"], [dict(m) for m in earlier], last["role"]
    if len(earlier) % 2 or any(m["role"] != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(earlier)):
        raise ValueError("for ChatGLM-6B/ChatGLM2-6B the messages before the query must alternate "
                         "user, assistant (no system messages)")
    pairs = [[earlier[i]["content"], earlier[i + 1]["content"]] for i in range(0, len(earlier), 2)]
    return last["content"], pairs, "user"


def stable_text(response: str, family: str) -> str:
    """The part of a reply-so-far that later tokens cannot change any more.

    Post-processing can rewrite the tail of a reply: a partial `[[训练时间]]` becomes `2023年` when
    complete; ChatGLM-6B makes `,!:;?` full-width when a CJK character follows; a ChatGLM3 tool
    call starts with the tool's name (ASCII, no newline) before it turns into a dict. Those tails
    are held back until they settle.
    """
    cut = len(response)
    for k in range(min(len(TRAINING_TIME_PLACEHOLDER) - 1, cut), 0, -1):
        if response.endswith(TRAINING_TIME_PLACEHOLDER[:k]):
            cut -= k
            break
    if family == "chatglm":
        while cut > 0 and response[cut - 1] in _V1_CHANGING:
            cut -= 1
    if family == "chatglm3" and "\n" not in response and len(response) < 64 and response.isascii() and \
            response.replace("_", "a").replace("-", "a").replace(".", "a").isalnum():
        cut = 0
    return response[:cut]
