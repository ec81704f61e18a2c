"""Tensor-parallel cells: each rank holds a slice of a layer and the collective that joins them
runs inside `construct` (MindSpore's forward hooks run only in PyNative, never under ms.jit).

Every cell here wraps the ordinary local-size cell (Linear, a quantized WeightLinear, or an
Embedding table), so the weight format and its kernels stay those of a single process; what
the wrapper adds is (1) the collective and (2) a loading rule: the checkpoint is the ordinary
full one, and `load_parameter` keeps this rank's slices of each full tensor (`Shard`) before
the wrapped cell stores them. The parameters keep their checkpoint names (`loaded_parameters`,
mindglm/loading.py).

    column-parallel  y_r = x W_r^T + b_r              (rows of W split; the output stays split)
    row-parallel     y = AllReduce(x_r W_r^T) + b     (columns of W split; the input is split)
    vocab-parallel   logits = AllGather(h E_r^T)      (vocabulary rows split, padded to equal parts)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from mindglm.checkpoint import CheckpointError
from mindglm.loading import fill_parameter


@dataclass(frozen=True)
class Shard:
    """The rows (axis 0) or columns (axis 1) of a full tensor that one rank keeps.

    `pieces` are (start, stop) ranges in the full axis of `length` entries, concatenated in
    order: [q | k | v] keeps one range of each part. `pad` zero entries are appended (the last
    vocabulary shard). A stored axis shorter than `length` by a whole factor (int4 packs two
    columns per byte) is cut at the same fractions. `keep_on_lead_only`: ranks other than 0
    get zeros (a row-parallel bias, added once to the reduced sum)."""

    axis: int
    length: int
    pieces: tuple
    pad: int = 0
    keep_on_lead_only: bool = False
    rank: int = 0

    def take(self, array: np.ndarray, name: str) -> np.ndarray:
        """This rank's part of the full tensor `array`."""
        if self.keep_on_lead_only:
            return array if self.rank == 0 else np.zeros_like(array)
        stored = array.shape[self.axis]
        if any(a * stored % self.length for piece in self.pieces for a in piece):
            raise CheckpointError(f"'{name}' has {stored} entries on axis {self.axis}, the full model has "
                                  f"{self.length}: the checkpoint and the model config disagree")
        cut = lambda at: at * stored // self.length  # noqa: E731
        # basic slices are views: a memory-mapped tensor is read (once) only where they look
        parts = [array[(slice(None),) * self.axis + (slice(cut(a), cut(b)),)] for a, b in self.pieces]
        if self.pad:
            shape = list(array.shape)
            shape[self.axis] = cut(self.pad)
            parts.append(np.zeros(shape, array.dtype))
        if len(parts) == 1:
            return np.ascontiguousarray(parts[0])
        return np.concatenate(parts, axis=self.axis)


class ShardedCell(nn.Cell):
    """A local-size cell plus the rule that cuts its parameters out of full checkpoint tensors."""

    def __init__(self, local: nn.Cell, shards: dict):
        super().__init__()
        self.local = local
        self.shards = shards        # local parameter name -> Shard; absent: the full tensor (replicated)

    def loaded_parameters(self):
        return self.local.parameters_and_names()

    def load_parameter(self, local: str, array: np.ndarray, name: str) -> list:
        shard = self.shards.get(local)
        part = array if shard is None else shard.take(array, name)
        params = dict(self.local.parameters_and_names())
        return fill_parameter(self.local, local, params.get(local), part, name)


class ParallelLinear(ShardedCell):
    """A linear layer's share: `in_features` / `out_features` are the full layer's (what an
    adapter trained on the whole model is checked against); `local` holds this rank's."""

    @property
    def in_features(self) -> int:
        shard = self.shards["weight"]
        return shard.length if shard.axis == 1 else self.local.in_features

    @property
    def out_features(self) -> int:
        shard = self.shards["weight"]
        return shard.length if shard.axis == 0 else self.local.out_features

    def low_rank_factors(self, a: np.ndarray, b: np.ndarray, name: str) -> tuple:
        """This rank's (A, B) of a low-rank update B A [out, in] of the full weight (LoRA): B's
        rows cut like the weight's rows (column-parallel), or A's columns like its columns
        (row-parallel), the other factor whole. B_r A_r is then exactly this rank's slice of
        B A, so merging it, or running it beside the local layer (a row-parallel one summing it
        in the same AllReduce), gives what the whole layer gives."""
        shard = self.shards["weight"]
        if shard.axis == 0:
            return a, shard.take(b, name)
        return shard.take(a, name), b


class ColumnParallelLinear(ParallelLinear):
    """This rank's output rows of a linear layer; no communication (the next layer takes them split)."""

    def construct(self, x):
        return self.local(x)


class RowParallelLinear(ParallelLinear):
    """This rank's input columns of a linear layer, the partial products summed over ranks.

    The bias is loaded on rank 0 only (zeros elsewhere), so the sum adds it exactly once and the
    wrapped cell (whose kernels may fuse the bias) needs no change."""

    def __init__(self, local: nn.Cell, shards: dict):
        super().__init__(local, shards)
        self.all_reduce = ops.AllReduce()

    def construct(self, x):
        return self.all_reduce(self.local(x))


def gather_vocab(logits, all_gather, world: int, vocab_size: int):
    """[tokens, vocab / world] per rank -> [tokens, vocab] on every rank (AllGather stacks on axis 0)."""
    tokens, local = logits.shape
    stacked = all_gather(logits).reshape(world, tokens, local)
    return stacked.transpose(1, 0, 2).reshape(tokens, world * local)[:, :vocab_size]


class VocabParallelLinear(ParallelLinear):
    """The output layer over this rank's vocabulary rows, the logits gathered whole on every rank."""

    def __init__(self, local: nn.Cell, shards: dict, world: int, vocab_size: int):
        super().__init__(local, shards)
        self.world, self.vocab_size = world, vocab_size
        self.all_gather = ops.AllGather()

    def construct(self, x):
        lead = x.shape[:-1]
        logits = self.local(x)
        flat = gather_vocab(logits.reshape(-1, logits.shape[-1]), self.all_gather, self.world, self.vocab_size)
        return flat.reshape(lead + (self.vocab_size,))


class VocabParallelEmbedding(ShardedCell):
    """This rank's rows [start, start + rows) of the embedding table.

    A lookup takes the ids this rank holds (zeros for the others) and sums over ranks: exactly
    one rank contributes each row, so the sum is the row itself. `logits()` is the tied output
    projection (GLM v1) over the same rows, gathered like VocabParallelLinear."""

    def __init__(self, local: nn.Cell, shards: dict, start: int, world: int, vocab_size: int):
        super().__init__(local, shards)
        self.start, self.rows = start, local.weight.shape[0]
        self.world, self.vocab_size = world, vocab_size
        self.all_reduce = ops.AllReduce()
        self.all_gather = ops.AllGather()

    def construct(self, input_ids):
        index = input_ids.astype(ms.int32) - self.start
        held = ops.logical_and(index >= 0, index < self.rows)
        rows = self.local(ops.select(held, index, ops.zeros_like(index)))
        rows = rows * held.expand_dims(-1).astype(rows.dtype)
        return self.all_reduce(rows)

    def logits(self, h):
        return gather_vocab(self.local.logits(h), self.all_gather, self.world, self.vocab_size)
