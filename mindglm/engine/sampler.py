"""Sampler: each sequence's next token from its logits, with its own settings and RNG."""
from __future__ import annotations

import numpy as np

from mindglm.engine.sequence import Sequence
from mindglm.generation.processors import choose_tokens, process_scores


def sample(seq: Sequence, logits: np.ndarray) -> int:
    """The next token of `seq`: its processors (repetition penalty over its own tokens, the
    invalid-score guard, temperature / top-k / top-p when sampling), then greedy or one draw
    from its RNG — so a sequence picks the same tokens whatever else runs beside it."""
    config = seq.generation
    history = seq.history() if config.repetition_penalty != 1.0 else None
    scores = process_scores(logits[None, :], history, config)
    return int(choose_tokens(scores, config, seq.rng)[0])
