"""Position ids and left padding: the one place these rules are written (numpy only).

Both the tokenizers (`pad_batch`, as THUDM's `_pad` returns them) and the models
(`prepare_positions`, as THUDM's modeling derives them) use these functions.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

# Which mask token fixes ChatGLM-6B's positions after <sop> when a prompt holds both. THUDM's two
# files disagree and each side here follows its own reference:
# - modeling_chatglm.py (ChatGLMForConditionalGeneration, `mask_token = gMASK if gMASK in seq
#   else MASK`): [gMASK] first;
# - tokenization_chatglm.py (`_pad`: `mask_token = mask_token_id if mask_token_id in
#   required_input else gmask_token_id`): [MASK] first.
PREFER_GMASK, PREFER_MASK = "gmask", "mask"


def glm_2d_positions(ids: Sequence[int], bos_token_id: int, mask_token_id: int, gmask_token_id: int,
                     prefer: str) -> tuple:
    """ChatGLM-6B's (positions [2, n], context length) for one unpadded row of ids.

    The context ends at `<sop>` (bos_token_id; the whole row when absent). Row 0 counts 0..n-1
    over the context and then stays at the mask token's index; row 1 (block positions) is 0 over
    the context, then 1, 2, 3, ... `prefer` (PREFER_GMASK or PREFER_MASK) picks the mask token
    when the row holds both.
    """
    if prefer not in (PREFER_GMASK, PREFER_MASK):
        raise ValueError(f"prefer must be {PREFER_GMASK!r} or {PREFER_MASK!r}, got {prefer!r}")
    ids = [int(i) for i in ids]
    length = len(ids)
    context = ids.index(bos_token_id) if bos_token_id in ids else length
    order = (gmask_token_id, mask_token_id) if prefer == PREFER_GMASK else (mask_token_id, gmask_token_id)
    positions = np.zeros((2, length), np.int64)
    positions[0] = np.arange(length)
    mask_id = next((m for m in order if m in ids), None)
    if mask_id is not None:
        positions[0, context:] = ids.index(mask_id)
    positions[1, context:] = np.arange(1, length - context + 1)
    return positions, context


def positions_from_padding(attention_mask: np.ndarray) -> np.ndarray:
    """ChatGLM2/3 positions [batch, seq] of a left-padded batch: 0 on padding, then 0..n-1."""
    return np.maximum(np.cumsum(np.asarray(attention_mask, np.int64), axis=1) - 1, 0)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, length: Optional[int] = None) -> tuple:
    """(input_ids, attention_mask), int64 [batch, length]: each row right-aligned after pad_id's.

    `length` defaults to the longest row; it must not be shorter.
    """
    length = max(len(seq) for seq in sequences) if length is None else length
    input_ids = np.full((len(sequences), length), pad_id, np.int64)
    attention_mask = np.zeros((len(sequences), length), np.int64)
    for row, seq in enumerate(sequences):
        if len(seq) > length:
            raise ValueError(f"row {row} has {len(seq)} ids, more than the padded length {length}")
        if len(seq):
            input_ids[row, length - len(seq):] = seq
            attention_mask[row, length - len(seq):] = 1
    return input_ids, attention_mask
