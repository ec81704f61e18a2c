"""Streamers receive tokens as they are chosen; the chat and batch front ends build on them."""
from __future__ import annotations

import numpy as np


class Streamer:
    """Base class: `put(tokens)` once per step with one id per row, `end()` once at the end."""

    def put(self, tokens: np.ndarray) -> None:
        pass

    def end(self) -> None:
        pass


class TokenCollector(Streamer):
    """Keeps every step's tokens; `rows()` returns them per row."""

    def __init__(self):
        self.steps = []
        self.finished = False

    def put(self, tokens):
        self.steps.append(np.asarray(tokens).copy())

    def end(self):
        self.finished = True

    def rows(self) -> list:
        if not self.steps:
            return []
        return [list(map(int, column)) for column in np.stack(self.steps, axis=1)]
