"""From generated ids to what a client sees: text deltas, stop strings, tool calls, finish reason.

A `Reply` follows one request. `push(ids)` returns the text that became safe to send: the text
post-processing cannot change any more (`mindglm.chat.stable_text`), minus a tail that could be
the start of a stop string. `finish()` gives the final text (or tool calls), the last delta and
the finish reason. The text of the final reply is exactly what `model.chat()` returns for the
same ids (`decode_reply` + `process_response`), truncated at a stop string if one was hit.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Optional

from mindglm import chat


def _stop_prefix_length(text: str, stops: list) -> int:
    """Length of the longest tail of `text` that is the beginning of a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def _has_metadata(family: str, output: str) -> bool:
    # A ChatGLM3 reply whose first line is not empty is a tool call (or a named segment): its text
    # is only known once the reply is complete, so none of it is streamed as content.
    return family == "chatglm3" and "\n" in output and bool(output.split("\n", 1)[0].strip())


@dataclass
class Final:
    """The finished reply: `text` (None for a tool call), `tool_calls`, and the last delta."""

    text: Optional[str]
    tool_calls: list = field(default_factory=list)
    delta: str = ""
    finish_reason: str = "stop"


class Reply:
    """One request's reply, built up from the ids the engine generates.

    chat: True applies the family's chat post-processing (and ChatGLM3 tool-call parsing against
    `history`); False (/v1/completions) returns the decoded text as is.
    """

    def __init__(self, tokenizer, family: str, chat_mode: bool, history=None, stops=(),
                 stop_ids=()):
        self.family, self.chat_mode, self.history = family, chat_mode, list(history or [])
        self.stops = [s for s in stops if s]
        self.stop_ids = set(stop_ids)
        self.decoder = chat.StreamDecoder(tokenizer, family)
        self.output = ""      # decoded output so far (raw, before chat post-processing)
        self.sent = ""        # text already handed out as deltas
        self.stopped = False  # a stop string was found: the engine sequence is to be aborted

    def push(self, new_ids: list, final_token_is_stop: bool = False) -> str:
        """Add generated ids; the new text safe to send (maybe ""). `final_token_is_stop`: the last
        id ended the sequence on a stop id, and is not part of the text."""
        if self.stopped:
            return ""
        if final_token_is_stop and new_ids and new_ids[-1] in self.stop_ids:
            new_ids = new_ids[:-1]
        text = self.decoder.push(new_ids) if new_ids else None
        if text is None:
            return ""
        self.output = text
        cut = self._stop_index(text)
        if cut is not None:
            self.output, self.stopped = text[:cut], True
            return ""  # the rest is sent by finish(), from the truncated output
        visible = text[:len(text) - _stop_prefix_length(text, self.stops)]
        return self._delta(self._stable(visible))

    def finish(self, finish_reason: str) -> Final:
        """The final reply once the sequence finished with the engine's `finish_reason`."""
        if self.stopped:
            finish_reason = "stop"
        output = self.output
        if not self.stopped and self.decoder.ids:
            output = chat.decode_reply(self.decoder.tokenizer, self.family, self.decoder.ids)
            cut = self._stop_index(output)
            if cut is not None:
                output, finish_reason = output[:cut], "stop"
        if not self.chat_mode:
            return Final(output, delta=self._delta(output), finish_reason=finish_reason)
        response = chat.process_response(self.family, output, self.history)
        if isinstance(response, dict) and "parameters" in response:
            call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                    "function": {"name": response["name"],
                                 "arguments": json.dumps(response["parameters"], ensure_ascii=False)}}
            return Final(None, [call], finish_reason="tool_calls")
        if isinstance(response, dict):  # a named segment without tools: its content is the reply
            response = response.get("content", "")
        if finish_reason == "tool_calls":  # <|observation|> without a parsable call
            finish_reason = "stop"
        return Final(response, delta=self._delta(response), finish_reason=finish_reason)

    # ------------------------------------------------------------------ helpers
    def _stop_index(self, text: str) -> Optional[int]:
        found = [text.find(stop) for stop in self.stops if stop in text]
        return min(found) if found else None

    def _stable(self, output: str) -> str:
        if not self.chat_mode:
            return output
        if _has_metadata(self.family, output):
            return ""
        response = chat.process_response(self.family, output, self.history)
        return chat.stable_text(response, self.family) if isinstance(response, str) else ""

    def _delta(self, text: str) -> str:
        # Post-processing only rewrites tails that stable_text holds back, so the text grows; if
        # it ever did not, nothing already sent can be taken back and the new text is skipped.
        if not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta
