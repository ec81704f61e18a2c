"""ChatGLM2-6B and ChatGLM3-6B (one network; the family only changes how rope_ratio applies).

What is particular to this family, on top of models/base.py:
- RMSNorm, SwiGLU MLP (THUDM's `dense_h_to_4h` holds the gate rows then the up rows),
- grouped-query attention with `multi_query_group_num` key/value heads and a qkv bias,
- rotary on the first half of each head's dims, interleaved pairs (x0, x1), (x2, x3), ...,
- long context: chatglm2-6b-32k divides positions by rope_ratio, chatglm3-6b-32k multiplies the
  rotary base by it (GLMConfig.effective_rope_scaling).
"""
from __future__ import annotations

import numpy as np
from mindspore import nn, ops

from mindglm.positions import positions_from_padding
from mindglm.models.base import Block, GLMTransformer, RotaryTable
from mindglm.models.layers import (Linear, Rotary, SelfAttention, default_query_scale, ms_dtype, norm_factory,
                                   rotary_angle_table, rotary_frequencies, rotate_interleaved_matrix)

# Generation advances the single position channel by one per token.
POSITION_STEP = np.array([1], np.int64)


def position_rule(config):
    """None: a generated token's position is the previous one plus POSITION_STEP."""
    return None


class SwiGLU(nn.Cell):
    """down(silu(gate(x)) * up(x)) with gate and up fused in one projection."""

    def __init__(self, config):
        super().__init__()
        param_dtype, compute_dtype = ms_dtype(config.param_dtype), ms_dtype(config.compute_dtype)
        self.ffn = config.ffn_hidden_size
        self.up = Linear(config.hidden_size, 2 * self.ffn, config.add_bias_linear, param_dtype, compute_dtype)
        self.down = Linear(self.ffn, config.hidden_size, config.add_bias_linear, param_dtype, compute_dtype)

    def construct(self, x):
        fused = self.up(x)
        gate, up = fused[..., : self.ffn], fused[..., self.ffn:]
        return self.down(ops.silu(gate) * up)


def rotary_angles(config) -> np.ndarray:
    """[seq_length, rotary_dims] angles, each frequency repeated for its interleaved pair."""
    base, position_scale = config.rotary_base, 1.0
    if config.effective_rope_scaling == "base":
        base = base * config.rope_ratio
    else:
        position_scale = config.rope_ratio
    inv_freq = rotary_frequencies(config.rotary_dims, base)
    return np.repeat(rotary_angle_table(config.seq_length, inv_freq, position_scale), 2, axis=1)


def build_network(config) -> GLMTransformer:
    """The ChatGLM2/3 network with zero weights (load a checkpoint into it)."""
    norm = norm_factory(config)
    rotary = Rotary(config.rotary_dims, config.head_dim, rotate_interleaved_matrix(config.rotary_dims))
    blocks = [
        Block(norm(), SelfAttention(config, rotary, default_query_scale(config.head_dim)), norm(),
              SwiGLU(config), residual_from_norm=config.apply_residual_connection_post_layernorm)
        for _ in range(config.num_layers)
    ]
    final_norm = norm() if config.post_layer_norm else nn.Identity()
    return GLMTransformer(config, blocks, final_norm, RotaryTable(rotary_angles(config)))


def prepare_positions(config, input_ids: np.ndarray, attention_mask=None, position_ids=None):
    """Position ids [batch, 1, seq] and prefix lengths [batch] (always 0: purely causal).

    Without explicit position ids, a left-padded batch counts from its first real token
    (0 on padding, then 0..n-1), as THUDM's tokenizer builds them.
    """
    batch, seq = input_ids.shape
    if position_ids is None:
        if attention_mask is None:
            position_ids = np.broadcast_to(np.arange(seq), (batch, seq))
        else:
            position_ids = positions_from_padding(attention_mask)
    position_ids = np.asarray(position_ids, np.int64).reshape(batch, 1, seq)
    return position_ids, np.zeros((batch,), np.int64)
