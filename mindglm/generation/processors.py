"""Logits processing on the host (numpy), in the order transformers applies it:
repetition penalty, the invalid-score guard, then temperature, top-k, top-p."""
from __future__ import annotations

import numpy as np

from mindglm.generation.config import GenerationConfig


def guard_invalid_scores(scores: np.ndarray) -> np.ndarray:
    """THUDM's InvalidScoreLogitsProcessor: a row with NaN/Inf becomes all zeros with 5e4 at id 5.

    The reference resets the whole batch when any row is bad; here only the bad rows are reset,
    so one broken row cannot change the others.
    """
    bad = ~np.isfinite(scores).all(axis=-1)
    if bad.any():
        scores = scores.copy()
        scores[bad] = 0.0
        scores[bad, 5] = 5e4
    return scores


def apply_repetition_penalty(scores: np.ndarray, sequences: np.ndarray, penalty: float) -> np.ndarray:
    """Divide positive (multiply negative) scores of every token already in the row.

    Negative ids in `sequences` (padding) are ignored."""
    if penalty == 1.0:
        return scores
    scores = scores.copy()
    for row in range(scores.shape[0]):
        seen = np.unique(sequences[row])
        seen = seen[seen >= 0]
        picked = scores[row, seen]
        scores[row, seen] = np.where(picked < 0, picked * penalty, picked / penalty)
    return scores


def apply_top_k(scores: np.ndarray, top_k: int) -> np.ndarray:
    """Keep the `top_k` highest scores of each row (ties at the cut are kept)."""
    if top_k <= 0 or top_k >= scores.shape[-1]:
        return scores
    kth = np.partition(scores, -top_k, axis=-1)[:, -top_k][:, None]
    return np.where(scores < kth, -np.inf, scores)


def apply_top_p(scores: np.ndarray, top_p: float) -> np.ndarray:
    """Nucleus filtering: keep the smallest set of tokens whose probability reaches `top_p`."""
    if top_p >= 1.0:
        return scores
    order = np.argsort(scores, axis=-1, kind="stable")            # ascending, as transformers does
    sorted_scores = np.take_along_axis(scores, order, axis=-1)
    probs = softmax(sorted_scores)
    cumulative = np.cumsum(probs, axis=-1)
    remove_sorted = cumulative <= (1.0 - top_p)
    remove_sorted[:, -1] = False                                  # always keep the best token
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, -np.inf, scores)


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def process_scores(scores: np.ndarray, sequences: np.ndarray, config: GenerationConfig) -> np.ndarray:
    """All processors of `config`, for the next token of every row. scores: [batch, vocab]."""
    scores = np.asarray(scores, np.float32)
    scores = apply_repetition_penalty(scores, sequences, config.repetition_penalty)
    scores = guard_invalid_scores(scores)
    if config.do_sample:
        if config.temperature != 1.0:
            scores = scores / np.float32(config.temperature)
        scores = apply_top_k(scores, config.top_k)
        scores = apply_top_p(scores, config.top_p)
    return scores


def choose_tokens(scores: np.ndarray, config: GenerationConfig, rng: np.random.Generator) -> np.ndarray:
    """Greedy argmax, or one draw per row from softmax(scores) when sampling."""
    if not config.do_sample:
        return scores.argmax(axis=-1).astype(np.int64)
    probs = softmax(scores.astype(np.float64))
    draws = rng.random(scores.shape[0])
    cumulative = np.cumsum(probs, axis=-1)
    picks = (cumulative < draws[:, None] * cumulative[:, -1:]).sum(axis=-1)
    return np.minimum(picks, scores.shape[-1] - 1).astype(np.int64)
