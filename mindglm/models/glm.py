"""ChatGLM-6B (GLM v1): 2D rotary positions, bidirectional context, blank infilling.

What is particular to this family, on top of models/base.py:
- LayerNorm with bias; GELU (tanh form) MLP with biases; output tied to the word embedding
  (GLMConfig's family defaults; the builders honour rmsnorm, add_bias_linear, post_layer_norm);
- each residual is taken from the norm output and scaled by alpha = sqrt(2 * 28): THUDM's
  ChatGLMModel never passes num_layers to GLMBlock, whose default is 28, so alpha is that of the
  28-layer model whatever config.num_layers says (the golden fixtures, 2 layers, confirm it);
- the query is scaled by 1 / (sqrt(head_dim) * layer_number) and the float32 scores multiplied
  back by layer_number, as the reference does;
- 2D rotary: the first half of each head is rotated by the position id, the second half by the
  block position id, each half rotate-half (NeoX) style. Everything before `<sop>` is the
  context (positions 0..n-1, attended bidirectionally); from `<sop>` on the position stays at the
  mask token's index while the block position counts 1, 2, 3, ...

Layout difference from THUDM: the fused qkv rows are regrouped at conversion from per-head
interleaved (q, k, v of head 0, then head 1, ...) to [all q | all k | all v], so the attention
Cell is the one ChatGLM2/3 use (see mindglm/checkpoint.py).
"""
from __future__ import annotations

import math

import numpy as np
from mindspore import nn, ops

from mindglm.positions import PREFER_GMASK, glm_2d_positions
from mindglm.models.base import Block, GLMTransformer, RotaryTable
from mindglm.models.layers import (Linear, Rotary, SelfAttention, ms_dtype, norm_factory, rotary_angle_table,
                                   rotary_frequencies, rotate_half_matrix)

# GLMBlock's default num_layers in the reference, the one its residual scale is computed from.
ALPHA_NUM_LAYERS = 28

# Explicit position ids are advanced as THUDM's _update_model_kwargs_for_generation does: the
# position stays, the block position counts on.
POSITION_STEP = np.array([0, 1], np.int64)


def position_rule(config):
    """The positions of a generated token from every token so far (prompt + reply, that token
    included), as THUDM's prepare_inputs_for_generation derives them at each step: the mask
    position is looked up in the whole sequence, [gMASK] first — so a reply that emits [gMASK]
    after a [MASK] prompt moves it, exactly as the reference does."""
    def positions_of_last(tokens):
        positions, _ = glm_2d_positions(tokens, config.bos_token_id, config.mask_token_id, config.gmask_token_id,
                                        PREFER_GMASK)
        return positions[:, -1]
    return positions_of_last


class GeluMLP(nn.Cell):
    """down(gelu_tanh(up(x))) with biases."""

    def __init__(self, config):
        super().__init__()
        param_dtype, compute_dtype = ms_dtype(config.param_dtype), ms_dtype(config.compute_dtype)
        bias = config.add_bias_linear
        self.up = Linear(config.hidden_size, config.ffn_hidden_size, bias, param_dtype, compute_dtype)
        self.down = Linear(config.ffn_hidden_size, config.hidden_size, bias, param_dtype, compute_dtype)

    def construct(self, x):
        # MindSpore's fused tanh-GELU is accurate to ~5e-7; its CPU ops.tanh alone is only ~1e-4.
        return self.down(ops.gelu(self.up(x), approximate="tanh"))


def rotary_angles(config) -> np.ndarray:
    """[seq_length, head_dim / 2] angles in rotate-half layout (frequencies written twice)."""
    inv_freq = rotary_frequencies(config.head_dim // 2, config.rotary_base)
    angles = rotary_angle_table(config.seq_length, inv_freq)
    return np.concatenate([angles, angles], axis=1)


def two_half_rotation(head_dim: int) -> np.ndarray:
    """Block-diagonal rotate-half for the position half and the block-position half."""
    half = rotate_half_matrix(head_dim // 2)
    rot = np.zeros((head_dim, head_dim), np.float32)
    rot[: head_dim // 2, : head_dim // 2] = half
    rot[head_dim // 2:, head_dim // 2:] = half
    return rot


def build_network(config) -> GLMTransformer:
    """The ChatGLM-6B network with zero weights (load a checkpoint into it)."""
    norm = norm_factory(config)
    rotary = Rotary(config.head_dim, config.head_dim, two_half_rotation(config.head_dim))
    alpha = math.sqrt(2 * ALPHA_NUM_LAYERS)
    blocks = []
    for layer_number in range(1, config.num_layers + 1):
        attention = SelfAttention(config, rotary, 1.0 / (math.sqrt(config.head_dim) * layer_number),
                                  score_scale=float(layer_number))
        blocks.append(Block(norm(), attention, norm(), GeluMLP(config), residual_from_norm=True,
                            residual_scale=alpha))
    final_norm = norm() if config.post_layer_norm else nn.Identity()
    return GLMTransformer(config, blocks, final_norm, RotaryTable(rotary_angles(config)))


def prepare_positions(config, input_ids: np.ndarray, attention_mask=None, position_ids=None):
    """2D position ids [batch, 2, seq] and context (prefix) lengths [batch], from the ids.

    For each row (after its left padding), `mindglm.positions.glm_2d_positions` with [gMASK]
    deciding when both mask tokens are present, as THUDM's modeling does.
    The prefix length returned is in slot units (padding included), so the mask can compare
    key slots with it directly.
    """
    batch, seq = input_ids.shape
    if attention_mask is None:
        attention_mask = np.ones((batch, seq), np.int64)
    explicit = None if position_ids is None else np.asarray(position_ids, np.int64).reshape(batch, 2, seq)
    positions = np.zeros((batch, 2, seq), np.int64)
    prefix_lengths = np.zeros((batch,), np.int64)
    for row in range(batch):
        start = int(np.argmax(attention_mask[row] > 0)) if attention_mask[row].any() else seq
        # THUDM's modeling prefers [gMASK] when both mask tokens are present (its tokenizer does not)
        positions[row, :, start:], context = glm_2d_positions(
            input_ids[row, start:], config.bos_token_id, config.mask_token_id, config.gmask_token_id, PREFER_GMASK)
        prefix_lengths[row] = start + context
    return (positions if explicit is None else explicit), prefix_lengths
