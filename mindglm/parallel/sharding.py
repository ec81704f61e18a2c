"""The tensor-parallel rewrite: which slice of every layer a rank holds.

    view = local_view(config, world)          # sizes of one rank's share: heads, kv groups, ffn
    network = build_network(view)             # attention, cores, MLP and KV cache read the view
    quantize_network(network, config)         # the weight format, on the local sizes
    shard_network(network, config, rank, world)   # wrap the linears and the embedding
    load_weights(network, full tensors)       # each wrapper keeps its rank's slices

Megatron's split, on mindglm's layouts (qkv rows [q | k | v], SwiGLU's up rows [gate | up]):
- qkv column-parallel by heads: query heads split evenly; key/value groups split when there are
  at least as many as ranks, otherwise every rank keeps the one group its query heads read
  (ChatGLM3's single group is on every rank);
- attention dense and MLP down row-parallel (AllReduce of the partial sums);
- MLP up column-parallel, each part of a fused [gate | up] split on its own;
- embedding and output layer vocab-parallel (AllGather of the logits, so every rank samples
  from the same full row).
"""
from __future__ import annotations

import dataclasses

from mindglm.config import ConfigError, GLMConfig
from mindglm.models.glm2 import SwiGLU
from mindglm.parallel.layers import (ColumnParallelLinear, RowParallelLinear, Shard, VocabParallelEmbedding,
                                     VocabParallelLinear)
from mindglm.rewrite import replace_cell


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_tensor_parallel(config: GLMConfig, world: int) -> None:
    """A ConfigError unless `world` ranks can split `config`'s heads, kv groups and MLP evenly."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ConfigError(f"tensor_parallel must be a positive integer, got {world!r}")
    heads, groups, ffn = config.num_attention_heads, config.kv_heads, config.ffn_hidden_size
    if heads % world:
        raise ConfigError(f"tensor_parallel {world} does not divide the model's {heads} attention heads: "
                          f"use one of {_divisors(heads)}")
    if groups % world and world % groups:
        raise ConfigError(f"tensor_parallel {world} cannot share the model's {groups} key/value groups "
                          f"(multi_query_group_num): it must divide them or be a multiple of them")
    if ffn % world:
        raise ConfigError(f"tensor_parallel {world} does not divide the MLP's {ffn} hidden units "
                          f"(ffn_hidden_size): use one of {_divisors(ffn)}")


def kv_groups_of(config: GLMConfig, rank: int, world: int) -> tuple:
    """(first group, number of groups) of the key/value heads rank `rank` stores."""
    groups = config.kv_heads
    if groups >= world:
        return rank * (groups // world), groups // world
    return rank * groups // world, 1   # replicated: the group this rank's query heads belong to


def local_view(config: GLMConfig, world: int) -> GLMConfig:
    """`config` with one rank's share of the heads, key/value groups and MLP units."""
    check_tensor_parallel(config, world)
    return dataclasses.replace(config, num_attention_heads=config.num_attention_heads // world,
                               multi_query_group_num=kv_groups_of(config, 0, world)[1],
                               ffn_hidden_size=config.ffn_hidden_size // world)


def _rows(pieces, length, rank, pad=0) -> dict:
    """Shards of a column-parallel layer: weight rows, and the bias / scale entries that go with them."""
    shard = Shard(axis=0, length=length, pieces=tuple(pieces), pad=pad, rank=rank)
    return {"weight": shard, "bias": shard, "weight_scale": shard}


def _columns(piece, length, rank) -> dict:
    """Shards of a row-parallel layer: weight columns; the per-row scale is whole, the bias on rank 0."""
    return {"weight": Shard(axis=1, length=length, pieces=(piece,), rank=rank),
            "bias": Shard(axis=0, length=0, pieces=(), keep_on_lead_only=True, rank=rank)}


def _even(total: int, rank: int, world: int) -> tuple:
    size = total // world
    return rank * size, (rank + 1) * size


def _vocab(vocab: int, rank: int, world: int) -> tuple:
    """(start, stop, pad) of rank's vocabulary rows: ceil(vocab / world) each, the last padded."""
    size = -(-vocab // world)
    start, stop = min(rank * size, vocab), min((rank + 1) * size, vocab)
    return start, stop, size - (stop - start)


def shard_network(network, config: GLMConfig, rank: int, world: int) -> list:
    """Wrap `network`'s (built from local_view, quantized) linears and embedding for rank `rank`
    of `world`; returns the paths rewritten. The weights are loaded afterwards, from full tensors."""
    check_tensor_parallel(config, world)
    d = config.head_dim
    q_full, kv_full = config.num_attention_heads * d, config.kv_heads * d
    first, count = kv_groups_of(config, rank, world)
    q = _even(q_full, rank, world)
    kv = (first * d, (first + count) * d)
    ffn = config.ffn_hidden_size
    up = _even(ffn, rank, world)
    rewritten = []

    def wrap(path, make):
        cells = dict(network.cells_and_names())
        replace_cell(network, path, make(cells[path]))
        rewritten.append(path)

    for index, block in enumerate(network.layers):
        p = f"layers.{index}."
        wrap(p + "attention.qkv", lambda cell: ColumnParallelLinear(cell, _rows(
            [q, (q_full + kv[0], q_full + kv[1]), (q_full + kv_full + kv[0], q_full + kv_full + kv[1])],
            q_full + 2 * kv_full, rank)))
        wrap(p + "attention.dense", lambda cell: RowParallelLinear(cell, _columns(q, q_full, rank)))
        if isinstance(block.mlp, SwiGLU):   # fused [gate | up] rows: each part split on its own
            pieces, length = [up, (ffn + up[0], ffn + up[1])], 2 * ffn
        else:
            pieces, length = [up], ffn
        wrap(p + "mlp.up", lambda cell: ColumnParallelLinear(cell, _rows(pieces, length, rank)))
        wrap(p + "mlp.down", lambda cell: RowParallelLinear(cell, _columns(up, ffn, rank)))

    vocab = config.vocab_size
    start, stop, pad = _vocab(vocab, rank, world)
    local_rows = stop - start + pad
    wrap("embedding", lambda cell: VocabParallelEmbedding(
        cell.resized(local_rows), {"weight": Shard(0, vocab, ((start, stop),), pad, rank=rank)},
        start, world, vocab))
    if network.output is not None:
        wrap("output", lambda cell: VocabParallelLinear(
            cell.resized(cell.in_features, local_rows), _rows([(start, stop)], vocab, rank, pad), world, vocab))
    return rewritten
