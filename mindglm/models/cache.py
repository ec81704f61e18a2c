"""Static KV cache: per-layer key/value Parameters written in place inside the compiled graph.

Layout [max_seq, batch, kv_heads, head_dim], slot-major: writing the new slots is one in-place
ScatterUpdate along the first axis, whatever the batch (measured here: a [batch, heads, slot,
dim] layout written with ScatterNdUpdate copied the whole cache on every write, ~11 ms per step
at batch 8 on the `small` benchmark model, against ~1 ms). ChatGLM2/3 store only their
`multi_query_group_num` key/value heads. Every row of a (left-padded) batch writes the same
slots. Attention reads only the first `window` slots — the runner sizes the window to the
prompt bucket plus the reply — so a step costs what the conversation needs, not the whole
cache. Stale slots from an earlier prompt need no clearing: the mask only admits slots written
for the current sequence.
"""
from __future__ import annotations

from mindspore import Parameter, nn, ops
from mindspore.common.initializer import initializer


class KVCache(nn.Cell):
    """Keys and values of one layer for `max_seq` slots."""

    parameter_group = "cache"  # runtime state, not weights: the loader skips it (mindglm/loading.py)

    def __init__(self, batch: int, kv_heads: int, max_seq: int, head_dim: int, dtype, name: str = "cache"):
        super().__init__()
        shape = (max_seq, batch, kv_heads, head_dim)
        self.batch, self.max_seq = batch, max_seq
        self.key = Parameter(initializer("zeros", shape, dtype), name=f"{name}.key", requires_grad=False)
        self.value = Parameter(initializer("zeros", shape, dtype), name=f"{name}.value", requires_grad=False)
        self.scatter = ops.ScatterUpdate()

    def update(self, k, v, slots, window: int):
        """Write k, v [batch, kv_heads, seq, head_dim] at `slots` [seq]; return the first `window`
        slots of both caches as [batch, kv_heads, window, head_dim]."""
        key = ops.depend(self.key, self.scatter(self.key, slots, k.transpose(2, 0, 1, 3).astype(self.key.dtype)))
        value = ops.depend(self.value,
                           self.scatter(self.value, slots, v.transpose(2, 0, 1, 3).astype(self.value.dtype)))
        return key[:window].transpose(1, 2, 0, 3), value[:window].transpose(1, 2, 0, 3)
