"""A conversation as a chat front end keeps it, without a model: the history, ChatGLM3's system
prompt and tools, and whether the model is waiting for a tool's result.

    conversation = Conversation("chatglm3")
    conversation.set_tools(load_tools("tools.json"))
    query, history, role = conversation.next_turn("北京天气")
    response, new_history = model.chat(tokenizer, query, history, role=role)
    conversation.finish_turn(response, new_history)   # a tool call: the next turn is its result
"""
from __future__ import annotations

import json
import os
from typing import Optional

from mindglm.chat import ChatError, system_messages


def load_tools(path: str) -> list:
    """Tool definitions from a JSON file: a list of {name, description, parameters}, or {"tools": [...]}."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as handle:
            tools = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ChatError(f"cannot read tools from {path}: {exc}") from None
    if isinstance(tools, dict) and "tools" in tools:
        tools = tools["tools"]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ChatError(f"{path}: expected a JSON list of tool definitions ({{name, description, parameters}})")
    return tools


class Conversation:
    """History and ChatGLM3 state of one conversation; the model is the caller's business."""

    def __init__(self, family: str):
        self.family = family
        self.history: list = []  # the family's history format, without the system message
        self.system_text: Optional[str] = None
        self.tools: Optional[list] = None
        self.awaiting_observation = False  # the model called a tool: the next turn is its result

    def _require_v3(self, what: str):
        if self.family != "chatglm3":
            raise ChatError(f"{what} needs a ChatGLM3 model; this is {self.family}")

    def set_system(self, text: Optional[str]):
        """ChatGLM3's system prompt (None or "" removes it)."""
        self._require_v3("a system prompt")
        self.system_text = text or None

    def set_tools(self, tools: Optional[list]):
        """ChatGLM3's tool definitions (None removes them)."""
        self._require_v3("tools")
        self.tools = tools

    def clear(self):
        """Forget the turns; the system prompt and tools stay."""
        self.history, self.awaiting_observation = [], False

    def system_messages(self) -> list:
        """The system message that opens every ChatGLM3 prompt ([] elsewhere or when unset)."""
        return system_messages(self.system_text, self.tools) if self.family == "chatglm3" else []

    def next_turn(self, text: str, role: Optional[str] = None) -> tuple:
        """(query, history, role) to pass to chat(): the role is "observation" while a tool's result
        is awaited, else "user"; the history starts with the system message."""
        if role is None:
            role = "observation" if self.awaiting_observation else "user"
        if role == "observation":
            self._require_v3("a tool result (observation)")
        return text, self.system_messages() + self.history, role

    def finish_turn(self, response, new_history: list):
        """Keep a completed turn: `new_history` as chat() returned it (system message included)."""
        self.history = list(new_history[len(self.system_messages()):])
        self.awaiting_observation = isinstance(response, dict) and "parameters" in response
