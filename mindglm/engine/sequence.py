"""Sequence: one request's state, from its prompt to its finish reason."""
from __future__ import annotations

import itertools
import time
from typing import Callable, Optional

import numpy as np

from mindglm.generation.config import GenerationConfig

FINISH_REASONS = ("stop", "length", "tool_calls", "abort")
_ids = itertools.count()


class Sequence:
    """A prompt, its position rule, its sampling settings and RNG, its stop ids and budget, and
    the tokens generated so far.

    positions [channels, prompt] are the prompt's position ids (GLM v1: two channels); later
    tokens advance the last one by `position_step` each, or, given a `position_rule`, take
    position_rule(tokens up to and including them) (GLM v1's THUDM rule). `context_length` is the number of
    leading tokens every query sees (GLM v1's bidirectional context), 0 for ChatGLM2/3.
    `num_computed` counts tokens whose keys/values are in the cache; `row` is its cache row.
    """

    def __init__(self, prompt_ids: list, positions: np.ndarray, position_step: np.ndarray,
                 context_length: int, generation: GenerationConfig, stop_ids, tool_call_ids,
                 max_tokens: int, request_id: Optional[str] = None, listener: Optional[Callable] = None,
                 capped: bool = False, position_rule: Optional[Callable] = None, seed: Optional[int] = None):
        self.request_id = request_id if request_id is not None else f"seq-{next(_ids)}"
        self.prompt_ids = list(prompt_ids)
        self.positions = np.asarray(positions, np.int64)
        self.position_step = np.asarray(position_step, np.int64)
        self.position_rule = position_rule
        self.context_length = int(context_length)
        self.generation = generation
        self.rng = np.random.default_rng(generation.seed if seed is None else seed)
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.tool_call_ids = frozenset(int(i) for i in tool_call_ids)
        self.max_tokens = int(max_tokens)
        self.capped = capped
        self.listener = listener
        self.output_ids: list = []
        self.num_computed = 0
        self.row: Optional[int] = None
        self.finish_reason: Optional[str] = None
        self.arrival_time = time.monotonic()
        self.first_token_time: Optional[float] = None
        self.finish_time: Optional[float] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefill_done(self) -> bool:
        return self.num_computed >= len(self.prompt_ids)

    def token_ids(self, start: int, end: int) -> list:
        return (self.prompt_ids + self.output_ids)[start:end]

    def positions_of(self, start: int, end: int) -> np.ndarray:
        """Position ids [channels, end - start] of tokens start..end-1."""
        prompt = len(self.prompt_ids)
        if self.position_rule is not None and end > prompt:
            tokens = self.prompt_ids + self.output_ids
            generated = [self.position_rule(tokens[: i + 1]) for i in range(max(start, prompt), end)]
            head = self.positions[:, start:prompt] if start < prompt else self.positions[:, :0]
            return np.concatenate([head, np.stack(generated, axis=1)], axis=1)
        index = np.arange(start, end)
        later = np.maximum(index - prompt + 1, 0)
        base = self.positions[:, np.minimum(index, prompt - 1)]
        return base + self.position_step.reshape(-1, 1) * later.reshape(1, -1)

    def history(self) -> np.ndarray:
        """Every token so far (what the repetition penalty looks at), [1, n]."""
        return np.asarray([self.prompt_ids + self.output_ids], np.int64)

    def append_token(self, token: int) -> None:
        """Record a generated token and finish if it is a stop id or the budget is spent."""
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.output_ids.append(token)
        if token in self.tool_call_ids:
            self.finish("tool_calls")
        elif token in self.stop_ids:
            self.finish("stop")
        elif len(self.output_ids) >= self.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        if reason not in FINISH_REASONS:
            raise ValueError(f"unknown finish reason {reason!r}")
        if self.finish_reason is None:
            self.finish_reason = reason
            self.finish_time = time.monotonic()
