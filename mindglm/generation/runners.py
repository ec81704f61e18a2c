"""Runners turn token ids into next-token scores. Both have the same two calls:

    scores = runner.start(input_ids, attention_mask, position_ids)   # [batch, vocab]
    scores = runner.advance(next_tokens)                             # [batch, vocab]

`FullForwardRunner` recomputes the whole sequence every step (no cache, PyNative): the exact
reference path. `CachedRunner` prefills once into a static KV cache and then runs a compiled
one-token decode graph; prompts are left-padded to a length bucket so a graph is compiled once
per (batch, bucket) and reused for every prompt and every token.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from mindglm.config import ConfigError
from mindglm.models import family_module


def _tensor(array) -> Tensor:
    return Tensor(np.ascontiguousarray(array, dtype=np.int32))


class SequenceState:
    """Host-side bookkeeping shared by both runners: mask, positions, context lengths."""

    def __init__(self, config, input_ids, attention_mask, position_ids):
        self.family = family_module(config)
        ids = np.asarray(input_ids, np.int64)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
        self.ids, self.mask = ids, mask
        self.positions, self.prefix_lengths = self.family.prepare_positions(config, ids, mask, position_ids)

    def next_positions(self) -> np.ndarray:
        """[batch, channels, 1] positions of the token about to be fed."""
        return self.positions[:, :, -1:] + self.family.POSITION_STEP.reshape(1, -1, 1)


def check_context(prompt_length: int, reserve: int, context: int) -> None:
    """A prompt plus the tokens to generate must fit the model's context."""
    if prompt_length + reserve > context:
        raise ConfigError(f"a prompt of {prompt_length} tokens plus {reserve} new ones exceeds the model's "
                          f"context ({context} tokens): shorten the prompt or lower max_new_tokens / max_length")


def full_forward(network, config, state: "SequenceState", last_only: bool) -> np.ndarray:
    """The network over a whole sequence, no cache: float32 logits [batch, seq or 1, vocab]."""
    seq = state.ids.shape[1]
    check_context(seq, 0, config.seq_length)
    logits = network(_tensor(state.ids), _tensor(state.positions), _tensor(state.mask),
                     _tensor(np.arange(seq)), _tensor(state.prefix_lengths), None, last_only)
    return logits.asnumpy()


class FullForwardRunner:
    """No cache: every step runs the network over the whole sequence (exact, slow)."""

    def __init__(self, network, config):
        self.network, self.config = network, config

    def start(self, input_ids, attention_mask=None, position_ids=None, reserve: int = 0):
        """Score the prompt; `reserve` is the number of tokens that will follow it."""
        self.state = SequenceState(self.config, input_ids, attention_mask, position_ids)
        check_context(self.state.ids.shape[1], reserve, self.config.seq_length)
        return self._scores()

    def advance(self, tokens):
        state = self.state
        state.positions = np.concatenate([state.positions, state.next_positions()], axis=2)
        state.ids = np.concatenate([state.ids, np.asarray(tokens, np.int64)[:, None]], axis=1)
        state.mask = np.concatenate([state.mask, np.ones((state.ids.shape[0], 1), np.int64)], axis=1)
        return self._scores()

    def _scores(self):
        return full_forward(self.network, self.config, self.state, last_only=True)[:, -1, :]


class CompiledStep(nn.Cell):
    """The network with its KV cache behind one graph-compiled call (last position's logits)."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    @ms.jit
    def construct(self, input_ids, position_ids, key_valid, query_slots, prefix_lengths, cache_slots):
        return self.network(input_ids, position_ids, key_valid, query_slots, prefix_lengths, cache_slots, True)


class CachedRunner:
    """Prefill into a static KV cache, then one compiled decode step per token.

    The cache has `cache_length` slots per row. A prompt of length S is left-padded to the
    smallest bucket >= S that leaves room for the reply (prompts longer than every bucket keep
    their length). Decode attends to a window of the cache: the smallest bucket (or the whole
    cache) that holds the padded prompt plus the reply, fixed for the whole generation, so a
    step costs the same at every position. Graphs are compiled once per (batch, bucket) for
    prefill and per (batch, window) for decode; `signatures` records each distinct one.
    Changing the batch size re-allocates the caches, which recompiles.
    """

    def __init__(self, network, config, cache_length: int):
        self.network, self.config = network, config
        self.cache_length = min(cache_length, config.seq_length)
        self.buckets = sorted(b for b in config.prefill_buckets if b < self.cache_length)
        self.batch = None
        self.cache_generation = 0
        self.step_cell = None
        self.signatures = set()

    def bucket_for(self, length: int, reserve: int = 0) -> int:
        """Smallest bucket that holds the prompt and leaves `reserve` slots for the reply; else the
        prompt's own length (padding it further would only take cache slots from the reply)."""
        check_context(length, reserve, self.cache_length)
        for bucket in self.buckets:
            if bucket >= length and bucket + reserve <= self.cache_length:
                return bucket
        return length

    def window_for(self, slots: int) -> int:
        """Cache slots decode attends to: the smallest bucket >= `slots`, else the whole cache."""
        return next((b for b in self.buckets if b >= slots), self.cache_length)

    def _ensure_cache(self, batch: int):
        if self.batch != batch:
            self.network.setup_caches(batch, self.cache_length)
            self.step_cell = CompiledStep(self.network)
            self.batch = batch
            self.cache_generation += 1

    def _run(self, ids, positions, key_valid, query_slots):
        args = (ids, positions, key_valid, query_slots, self.prefix_lengths, query_slots)
        self.signatures.add((self.cache_generation,) + tuple(np.shape(a) for a in args))
        logits = self.step_cell(*(_tensor(a) for a in args))
        return logits.asnumpy()[:, -1, :]

    def start(self, input_ids, attention_mask=None, position_ids=None, reserve: Optional[int] = None):
        """Prefill the prompt; `reserve` is the number of tokens that will follow it (None: as many
        as the cache holds, attending to the whole cache)."""
        state = SequenceState(self.config, input_ids, attention_mask, position_ids)
        batch, length = state.ids.shape
        bucket = self.bucket_for(length, reserve or 0)
        extra = bucket - length
        self._ensure_cache(batch)
        pad_id = self.config.pad_id
        ids = np.pad(state.ids, ((0, 0), (extra, 0)), constant_values=pad_id)
        positions = np.pad(state.positions, ((0, 0), (0, 0), (extra, 0)))
        window = self.cache_length if reserve is None else self.window_for(bucket + reserve)
        self.key_valid = np.zeros((batch, window), np.int64)
        self.key_valid[:, :bucket] = np.pad(state.mask, ((0, 0), (extra, 0)))
        self.prefix_lengths = state.prefix_lengths + extra
        self.state, self.slot = state, bucket
        return self._run(ids, positions, self.key_valid[:, :bucket], np.arange(bucket))

    def advance(self, tokens):
        if self.slot >= self.key_valid.shape[1]:
            raise ConfigError(f"generation ran past the {self.key_valid.shape[1]} cache slots reserved for it: "
                              "pass the whole budget as max_new_tokens / max_length")
        positions = self.state.next_positions()
        self.state.positions = positions
        self.key_valid[:, self.slot] = 1
        slots = np.array([self.slot])
        self.slot += 1
        return self._run(np.asarray(tokens, np.int64)[:, None], positions, self.key_valid, slots)
