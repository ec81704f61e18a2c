"""KV cache pool: a fixed set of rows, each holding one sequence's keys and values, written in
place inside the compiled graph.

One layer's keys are a flat Parameter [rows * max_len, kv_heads, head_dim] (values alike): row r
owns slots r*max_len .. r*max_len + max_len - 1. New keys are written at a per-token slot
mapping with one in-place ScatterUpdate along the first axis, so rows that prefill, decode or
idle share one call; attention then gathers the slots each batch row reads (`kv_slots`).
Measured here (one layer, fp32): the write and the gather cost about what a single-batch cache
did and stay flat as the pool grows, while a ScatterNdUpdate on a [batch, heads, slot, dim]
layout copied the whole cache on every write (11.7 ms at 16k slots) and reading by reshaping
the whole Parameter copied it too (13 ms at 16k).

ChatGLM2/3 store only their `multi_query_group_num` key/value heads. Stale slots need no
clearing: the mask only admits slots written for the row's current sequence.
"""
from __future__ import annotations

from mindspore import Parameter, nn, ops
from mindspore.common.initializer import initializer


class KVCache(nn.Cell):
    """Keys and values of one layer for `rows` rows of `max_len` slots."""

    parameter_group = "cache"  # runtime state, not weights: the loader skips it (mindglm/loading.py)

    def __init__(self, rows: int, max_len: int, kv_heads: int, head_dim: int, dtype, name: str = "cache"):
        super().__init__()
        self.max_len = max_len
        shape = (rows * max_len, kv_heads, head_dim)
        self.key = Parameter(initializer("zeros", shape, dtype), name=f"{name}.key", requires_grad=False)
        self.value = Parameter(initializer("zeros", shape, dtype), name=f"{name}.value", requires_grad=False)
        self.scatter = ops.ScatterUpdate()

    def update(self, k, v, slot_mapping, kv_slots):
        """Write k, v [batch, seq, kv_heads, head_dim] at `slot_mapping` [batch * seq] (flat slot
        of every token), then read the slots `kv_slots` [batch, keys] names for each row (its
        cache row's first slots, or for a row packing several sequences each one's slots in
        turn) as [batch, kv_heads, keys, head_dim]."""
        batch, _, heads, dim = k.shape
        keys_per_row = kv_slots.shape[1]
        all_keys, all_values = self.write(k, v, slot_mapping)
        slots = kv_slots.reshape(-1)
        keys = ops.gather(all_keys, slots, 0).reshape(batch, keys_per_row, heads, dim)
        values = ops.gather(all_values, slots, 0).reshape(batch, keys_per_row, heads, dim)
        return keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3)

    def write(self, k, v, slot_mapping):
        """Write k, v [..., kv_heads, head_dim] (one per entry of `slot_mapping`) at their slots;
        returns the whole key and value Parameters, ordered after the writes."""
        heads, dim = k.shape[-2:]
        written_k = self.scatter(self.key, slot_mapping, k.reshape(-1, heads, dim).astype(self.key.dtype))
        written_v = self.scatter(self.value, slot_mapping, v.reshape(-1, heads, dim).astype(self.value.dtype))
        return ops.depend(self.key, written_k), ops.depend(self.value, written_v)
