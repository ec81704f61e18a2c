"""The decode loop: start a runner on the prompt, then choose and feed one token per step."""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

from mindglm.generation.config import GenerationConfig
from mindglm.generation.processors import choose_tokens, process_scores
from mindglm.generation.streamers import Streamer


def decode_steps(runner, input_ids, attention_mask=None, position_ids=None,
                 config: Optional[GenerationConfig] = None, default_stop_ids=(),
                 pad_token_id: int = 0) -> Iterator[np.ndarray]:
    """Yield the chosen token of every row, one step at a time ([batch] int64 per step).

    Each row stops on its own at one of its stop ids; finished rows get the pad id until every
    row is done or the token budget is spent. A consumer may stop iterating at any time (a chat
    front end interrupted by Ctrl-C): nothing needs cleaning up.
    """
    config = config or GenerationConfig()
    sequences = np.asarray(input_ids, np.int64)
    batch, prompt_length = sequences.shape
    budget = config.new_token_budget(prompt_length)
    if budget == 0:
        return
    stop_ids = np.asarray(config.stop_ids(list(default_stop_ids)), np.int64)
    pad = config.pad_token_id if config.pad_token_id is not None else pad_token_id
    rng = np.random.default_rng(config.seed)
    finished = np.zeros(batch, bool)
    scores = runner.start(sequences, attention_mask, position_ids, reserve=budget)
    # what the repetition penalty sees: the text so far, padding (-1) excluded
    history = sequences if attention_mask is None else np.where(np.asarray(attention_mask, bool), sequences, -1)
    for step in range(budget):
        tokens = choose_tokens(process_scores(scores, history, config), config, rng)
        tokens = np.where(finished, pad, tokens)
        if config.repetition_penalty != 1.0:
            history = np.concatenate([history, tokens[:, None]], axis=1)
        finished |= np.isin(tokens, stop_ids)
        yield tokens
        if finished.all() or step == budget - 1:
            return
        scores = runner.advance(tokens)


def generate(runner, input_ids, attention_mask=None, position_ids=None,
             config: Optional[GenerationConfig] = None, default_stop_ids=(), pad_token_id: int = 0,
             streamer: Optional[Streamer] = None) -> np.ndarray:
    """Generate for a (left-padded) batch; returns [batch, prompt + new] int64."""
    steps = [np.asarray(input_ids, np.int64)]
    for tokens in decode_steps(runner, input_ids, attention_mask, position_ids, config, default_stop_ids,
                               pad_token_id):
        steps.append(tokens[:, None])
        if streamer is not None:
            streamer.put(tokens)
    if streamer is not None:
        streamer.end()
    return np.concatenate(steps, axis=1)
