"""Scheduler: decides which sequences run in the next step and emits it as plain data.

Each step it admits waiting sequences into free cache rows, hands out prefill chunks up to a
token budget (`chunk_size`) in arrival order, and decodes one token for every sequence whose
prompt is already in the cache. Nothing here touches tensors: the ModelRunner executes a
StepPlan, the Engine samples, and `update()` books the result.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from mindglm.engine.config import EngineConfig
from mindglm.engine.sequence import Sequence


class QueueFull(RuntimeError):
    """Too many requests are already waiting for a cache row."""


@dataclass
class PrefillChunk:
    """Prompt tokens start..start+len(token_ids)-1 of one sequence, written to its row."""

    request_id: str
    row: int
    start: int
    token_ids: list
    positions: np.ndarray          # [channels, len(token_ids)]
    context_length: int
    samples: bool                  # the chunk ends the prompt: its last logits choose a token


@dataclass
class DecodeRow:
    """One sequence's newest token, written at slot `slot` of its row."""

    request_id: str
    row: int
    token_id: int
    position: np.ndarray           # [channels]
    slot: int
    context_length: int


@dataclass
class StepPlan:
    prefill: list = field(default_factory=list)
    decode: list = field(default_factory=list)
    decode_steps: int = 1          # greedy decode steps the runner may take in one call (EngineConfig)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    """Waiting and running queues over a fixed pool of cache rows."""

    def __init__(self, config: EngineConfig, max_model_len: int, decode_steps: int = 1):
        self.config = config
        self.max_model_len = max_model_len
        self.decode_steps = decode_steps   # what the runner can take in one call (1: one step a call)
        self.waiting: deque = deque()
        self.running: list = []
        self.free_rows = list(range(config.max_num_seqs))

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting for one of the "
                            f"{self.config.max_num_seqs} sequences: retry later or raise engine.max_waiting")
        self.waiting.append(seq)

    def find(self, request_id: str) -> Optional[Sequence]:
        for seq in list(self.waiting) + self.running:
            if seq.request_id == request_id:
                return seq
        return None

    def abort(self, request_id: str) -> Optional[Sequence]:
        """Finish a sequence with reason "abort" and free its row; None if it is not here."""
        seq = self.find(request_id)
        if seq is not None:
            seq.finish("abort")
            self._release_finished()
        return seq

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        while self.waiting and self.free_rows:
            seq = self.waiting.popleft()
            seq.row = self.free_rows.pop(0)
            self.running.append(seq)
        plan = StepPlan()
        budget = self.config.chunk_size
        for seq in self.running:
            if seq.prefill_done:
                if seq.output_ids:
                    slot = seq.num_computed
                    plan.decode.append(DecodeRow(seq.request_id, seq.row, seq.output_ids[-1],
                                                 seq.positions_of(slot, slot + 1)[:, 0], slot, seq.context_length))
                continue
            if budget <= 0:
                continue
            start, remaining = seq.num_computed, len(seq.prompt_ids) - seq.num_computed
            if start < seq.context_length:
                # GLM v1's context is bidirectional: every query of it must see all of it, so it
                # cannot be split; it waits for a step with room for it (or one of its own).
                if remaining > budget and budget < self.config.chunk_size:
                    continue
                length = remaining
            else:
                length = min(remaining, budget)
            budget -= length
            end = start + length
            plan.prefill.append(PrefillChunk(seq.request_id, seq.row, start, seq.token_ids(start, end),
                                             seq.positions_of(start, end), seq.context_length,
                                             samples=end == len(seq.prompt_ids)))
        decoding = [seq for seq in self.running if seq.prefill_done and seq.output_ids]
        if self.decode_steps > 1 and decoding and all(self._multi_step(seq) for seq in decoding):
            plan.decode_steps = self.decode_steps
        return plan

    def _multi_step(self, seq: Sequence) -> bool:
        """Whether `seq` may decode decode_steps tokens in one call: greedy with no repetition
        penalty (a sampler that would often choose other than the argmax wastes the later steps),
        positions one apart (ChatGLM2/3's rule), and room for every step in its row."""
        generation = seq.generation
        return (not generation.do_sample and generation.repetition_penalty == 1.0 and seq.position_rule is None
                and seq.position_step.tolist() == [1] and seq.num_computed + self.decode_steps <= self.max_model_len)

    def update(self, plan: StepPlan, decoded: dict = None) -> None:
        """Book an executed plan: the scheduled tokens are now in the cache; `decoded`: the tokens
        each decode row kept ({request_id: n}, default 1) — its first n fed tokens are."""
        by_id = {seq.request_id: seq for seq in self.running}
        for chunk in plan.prefill:
            if chunk.request_id in by_id:
                by_id[chunk.request_id].num_computed += len(chunk.token_ids)
        for row in plan.decode:
            if row.request_id in by_id:
                by_id[row.request_id].num_computed += (decoded or {}).get(row.request_id, 1)
        self._release_finished()

    def _release_finished(self) -> None:
        self.waiting = deque(seq for seq in self.waiting if not seq.finished)
        for seq in [s for s in self.running if s.finished]:
            self.running.remove(seq)
            self.free_rows.append(seq.row)
        self.free_rows.sort()
