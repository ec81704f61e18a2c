"""The GLM transformer skeleton shared by every family.

A family (glm.py, glm2.py) supplies its norm, MLP, rotary layout and residual rule; this file
reads top to bottom the same for all of them:

    h = embed(ids)
    for block: x = norm(h); h = residual(h, x) + attn(x); x = norm(h); h = residual(h, x) + mlp(x)
    logits = output(final_norm(h))
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from mindglm.models.cache import KVCache
from mindglm.models.layers import Embedding, Linear, SelfAttention, attention_mask, ms_dtype


class Block(nn.Cell):
    """One transformer layer. GLM v1 takes its residual from the norm output, scaled by alpha."""

    def __init__(self, input_norm, attention: SelfAttention, post_attention_norm, mlp,
                 residual_from_norm: bool, residual_scale: float = 1.0):
        super().__init__()
        self.input_norm = input_norm
        self.attention = attention
        self.post_attention_norm = post_attention_norm
        self.mlp = mlp
        self.residual_from_norm = residual_from_norm
        self.residual_scale = residual_scale

    def _residual(self, h, x):
        if not self.residual_from_norm:
            return h
        if self.residual_scale == 1.0:
            return x
        return x * self.residual_scale

    def construct(self, h, cos, sin, mask, slot_mapping=None, kv_slots=None):
        x = self.input_norm(h)
        h = self._residual(h, x) + self.attention(x, cos, sin, mask, slot_mapping, kv_slots)
        x = self.post_attention_norm(h)
        return self._residual(h, x) + self.mlp(x)


class RotaryTable(nn.Cell):
    """Per-token cos/sin from position ids [batch, channels, seq] (channels: 1, or 2 for GLM v1).

    Each channel gathers its own row of the angle table; the channels are concatenated on the
    feature axis, giving [batch, seq, 1, channels * width] ready to broadcast over heads.
    """

    def __init__(self, angles: np.ndarray):
        super().__init__()
        self.cos_table = Tensor(np.cos(angles).astype(np.float32), ms.float32)
        self.sin_table = Tensor(np.sin(angles).astype(np.float32), ms.float32)

    def construct(self, position_ids):
        channels = position_ids.shape[1]
        cos = ops.gather(self.cos_table, position_ids[:, 0], 0)
        sin = ops.gather(self.sin_table, position_ids[:, 0], 0)
        if channels == 2:
            cos = ops.concat((cos, ops.gather(self.cos_table, position_ids[:, 1], 0)), -1)
            sin = ops.concat((sin, ops.gather(self.sin_table, position_ids[:, 1], 0)), -1)
        return cos.expand_dims(2), sin.expand_dims(2)


class GLMTransformer(nn.Cell):
    """Embedding, blocks, final norm and output projection (tied to the embedding for GLM v1).

    Inputs (int32 Tensors, built on the host from a step plan or a prompt):
      input_ids [batch, seq]; position_ids [batch, channels, seq];
      key_valid [batch, keys] — which keys are real (keys = seq without a cache; with one, the
      cache slots each row attends to);
      query_first, query_last [batch, seq] — the range of its row's keys each query sees
      (layers.attention_mask; `mask_inputs` builds them for one sequence per row);
      slot_mapping [batch * seq] and kv_slots [batch, keys], or None — with a KV cache: the flat
      cache slot each new token's key/value goes to, and the cache slots each row's keys are;
      logits_index [n] or None — project only these tokens (flat indices into batch * seq) to
      the vocabulary (what generation needs), giving [n, vocab]; None: every position.
    """

    def __init__(self, config, blocks, final_norm, rotary_table: RotaryTable):
        super().__init__()
        self.config = config
        param_dtype = ms_dtype(config.param_dtype)
        self.compute_dtype = ms_dtype(config.compute_dtype)
        self.embedding = Embedding(config.vocab_size, config.hidden_size, param_dtype)
        self.layers = nn.CellList(blocks)
        self.final_norm = final_norm
        self.rotary_table = rotary_table
        self.output = None
        if not config.tie_word_embeddings:
            self.output = Linear(config.hidden_size, config.vocab_size, False, param_dtype, self.compute_dtype)

    def construct(self, input_ids, position_ids, key_valid, query_first, query_last,
                  slot_mapping=None, kv_slots=None, logits_index=None):
        h, cos, sin, mask = self.layer_inputs(input_ids, position_ids, key_valid, query_first, query_last)
        for block in self.layers:
            h = block(h, cos, sin, mask, slot_mapping, kv_slots)
        return self.to_logits(h, logits_index)

    def layer_inputs(self, input_ids, position_ids, key_valid, query_first, query_last):
        """The first layer's input [batch, seq, hidden] and every layer's cos, sin and mask."""
        h = self.embedding(input_ids).astype(self.compute_dtype)
        cos, sin = self.rotary_table(position_ids)
        return h, cos, sin, attention_mask(key_valid, query_first, query_last)

    def to_logits(self, h, logits_index=None):
        """The last layer's output -> float32 logits (of the tokens `logits_index` names, if given)."""
        if logits_index is not None:
            batch, seq, hidden = h.shape
            h = ops.gather(h.reshape(batch * seq, hidden), logits_index.astype(ms.int32), 0).expand_dims(1)
        h = self.final_norm(h)
        logits = self.project(h)
        return logits if logits_index is None else logits.reshape(logits.shape[0], -1)

    def setup_caches(self, rows: int, max_len: int):
        """Attach a KVCache pool of `rows` rows x `max_len` slots to every attention layer.

        Found by type, not by attribute path, so an adapter wrapping an attention cell (P-Tuning's
        PrefixAttention) still finds its cache where the SelfAttention inside it looks."""
        attentions = [(path, cell) for path, cell in self.cells_and_names() if isinstance(cell, SelfAttention)]
        for path, attention in attentions:
            # Named by hand: a cell attached after build does not get its path as a name prefix.
            attention.cache = KVCache(rows, max_len, self.config.kv_heads, self.config.head_dim,
                                      self.compute_dtype, name=f"{path}.cache")

    def project(self, h):
        """Hidden states [batch, seq, hidden] -> float32 logits [batch, seq, vocab]."""
        if self.output is not None:
            return self.output(h).astype(ms.float32)
        batch, seq, hidden = h.shape
        logits = self.embedding.logits(h.reshape(-1, hidden).astype(self.compute_dtype))
        return logits.reshape(batch, seq, -1).astype(ms.float32)
