"""Static KV cache: per-layer key/value Parameters written in place inside the compiled graph.

Layout [batch, kv_heads, max_seq, head_dim]: ChatGLM2/3 store only their
`multi_query_group_num` key/value heads. Every row of a (left-padded) batch writes the same
slots, so one index tensor built per step serves all layers. Stale slots from an earlier prompt
need no clearing: the attention mask only admits slots written for the current sequence.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import initializer


def cache_scatter_index(batch: int, kv_heads: int, cache_slots):
    """[batch, kv_heads, seq, 3] (row, head, slot) triples for ScatterNdUpdate."""
    seq = cache_slots.shape[0]
    shape = (batch, kv_heads, seq, 1)
    rows = ops.arange(batch, dtype=ms.int32).reshape(batch, 1, 1, 1).broadcast_to(shape)
    heads = ops.arange(kv_heads, dtype=ms.int32).reshape(1, kv_heads, 1, 1).broadcast_to(shape)
    slots = cache_slots.astype(ms.int32).reshape(1, 1, seq, 1).broadcast_to(shape)
    return ops.concat((rows, heads, slots), -1)


class KVCache(nn.Cell):
    """Keys and values of one layer for `max_seq` slots."""

    def __init__(self, batch: int, kv_heads: int, max_seq: int, head_dim: int, dtype, name: str = "cache"):
        super().__init__()
        shape = (batch, kv_heads, max_seq, head_dim)
        self.batch, self.max_seq = batch, max_seq
        self.key = Parameter(initializer("zeros", shape, dtype), name=f"{name}.key", requires_grad=False)
        self.value = Parameter(initializer("zeros", shape, dtype), name=f"{name}.value", requires_grad=False)
        self.scatter = ops.ScatterNdUpdate()

    def update(self, k, v, scatter_index):
        """Write k, v [batch, kv_heads, seq, head_dim] at the index's slots; return the caches."""
        key = ops.depend(self.key, self.scatter(self.key, scatter_index, k.astype(self.key.dtype)))
        value = ops.depend(self.value, self.scatter(self.value, scatter_index, v.astype(self.value.dtype)))
        return key, value
