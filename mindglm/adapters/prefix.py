"""P-Tuning v2 prefixes: `pre_seq_len` learned keys/values per layer, ahead of every sequence's own.

THUDM's prefix encoder maps the prefix tokens 0..P-1 to rows of [layers * 2 * kv_heads * head_dim]:
an embedding, or with `prefix_projection` an embedding -> Linear -> tanh -> Linear. Its
`get_prompt()` views a row as [layers * 2, kv_heads, head_dim] and splits it in pairs, so layer i's
keys are chunk 2i and its values chunk 2i+1. They are concatenated to the layer's keys/values
after rotary, so they carry no rotary and the tokens' positions do not move.

Key-axis convention, one for both paths: [prefix 0..P-1 | the sequence's tokens]. Queries are
shifted by P on it and the P prefix keys are always valid (`prefixed_mask_inputs`). With a KV cache
the prefix fills slots [0, P) of every cache row once (`fill_prefix_slots`) and the ModelRunner
writes a row's tokens from slot P; without one, PrefixAttention concatenates it ahead of each
chunk's keys. The plain network is untouched: the prefix is a rewrite wrapping SelfAttention.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from mindglm.adapters.dropout import MaskedDropout
from mindglm.models.layers import Linear, SelfAttention, mask_inputs
from mindglm.rewrite import replace_cell


class PrefixEncoder(nn.Cell):
    """THUDM's PrefixEncoder: prefix tokens -> [P, layers * 2 * kv_heads * head_dim] (float32).

    Parameter names are THUDM's (`embedding.weight`, `trans.0.*`, `trans.2.*`), so its
    checkpoint loads and saves under `transformer.prefix_encoder.` + these names."""

    def __init__(self, pre_seq_len: int, embedding_size: int, output_size: int, projection_size: int = 0):
        super().__init__()
        self.pre_seq_len, self.output_size = pre_seq_len, output_size
        self.embedding = nn.Cell()
        self.embedding.weight = Parameter(np.zeros((pre_seq_len, embedding_size), np.float32), name="weight")
        self.trans = None
        if projection_size:
            self.trans = nn.SequentialCell([Linear(embedding_size, projection_size, True, ms.float32, ms.float32),
                                            nn.Tanh(),
                                            Linear(projection_size, output_size, True, ms.float32, ms.float32)])

    def construct(self):
        rows = self.embedding.weight
        return rows if self.trans is None else self.trans(rows)


def split_layers(encoded: np.ndarray, layers: int, kv_heads: int, head_dim: int) -> list:
    """[(keys, values)] per layer, each [P, kv_heads, head_dim], from the encoder's [P, layers*2*kv*d]."""
    pairs = encoded.reshape(encoded.shape[0], layers, 2, kv_heads, head_dim)
    return [(np.ascontiguousarray(pairs[:, i, 0]), np.ascontiguousarray(pairs[:, i, 1])) for i in range(layers)]


class PrefixAttention(nn.Cell):
    """A SelfAttention with P fixed keys/values [P, kv_heads, head_dim] ahead of the sequence's."""

    parameter_group = "adapter"  # not base weights: mindglm/loading.py leaves these alone

    def __init__(self, attention: SelfAttention, keys: np.ndarray, values: np.ndarray, trainable: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        self.attention = attention
        self.prefix_length = keys.shape[0]
        dtype = attention.compute_dtype
        self.prefix_key = Parameter(Tensor(keys, dtype), name="prefix_key", requires_grad=trainable)
        self.prefix_value = Parameter(Tensor(values, dtype), name="prefix_value", requires_grad=trainable)
        # THUDM drops out the prefix keys/values while training (get_prompt's Dropout); masks per batch row
        self.key_dropout = self.value_dropout = None
        if dropout:
            self.key_dropout = MaskedDropout(dropout, keys.shape, leading=1)
            self.value_dropout = MaskedDropout(dropout, values.shape, leading=1)

    def construct(self, x, cos, sin, mask, slot_mapping=None, kv_slots=None):
        if slot_mapping is not None:  # the prefix already sits in slots [0, P) of every cache row
            return self.attention(x, cos, sin, mask, slot_mapping, kv_slots)
        q, k, v = self.attention.project(x, cos, sin)
        batch = x.shape[0]
        keys = ops.broadcast_to(self.prefix_key.astype(k.dtype).expand_dims(0), (batch,) + self.prefix_key.shape)
        values = ops.broadcast_to(self.prefix_value.astype(v.dtype).expand_dims(0), (batch,) + self.prefix_value.shape)
        if self.key_dropout is not None:
            keys, values = self.key_dropout(keys), self.value_dropout(values)
        k = ops.concat((keys, k), 1).transpose(0, 2, 1, 3)
        v = ops.concat((values, v), 1).transpose(0, 2, 1, 3)
        return self.attention.attend(q, k, v, mask)

    def fill_cache(self) -> None:
        """Write the prefix into slots [0, P) of every row of the attached KVCache."""
        cache = self.attention.cache
        rows = cache.key.shape[0] // cache.max_len
        slots = (np.arange(rows)[:, None] * cache.max_len + np.arange(self.prefix_length)).reshape(-1)
        slots = Tensor(slots.astype(np.int32))
        for target, prefix in ((cache.key, self.prefix_key), (cache.value, self.prefix_value)):
            tiled = ops.tile(prefix.astype(target.dtype), (rows, 1, 1))
            ops.scatter_update(target, slots, tiled)


def apply_prefix(network, per_layer: list, trainable: bool = False, dropout: float = 0.0) -> int:
    """Wrap every layer's attention in a PrefixAttention holding its (keys, values); returns P."""
    for index, (keys, values) in enumerate(per_layer):
        block = network.layers[index]
        replace_cell(network, f"layers.{index}.attention",
                     PrefixAttention(block.attention, keys, values, trainable, dropout))
    return per_layer[0][0].shape[0]


def prefix_widths(config, projection: bool) -> tuple:
    """(embedding width, projection width or 0, output width) of THUDM's PrefixEncoder for `config`:
    ChatGLM2/3 embed into the output width and project through hidden_size, ChatGLM-6B embeds
    into hidden_size and projects through hidden_size; without projection the embedding is the output."""
    output = config.num_layers * 2 * config.kv_heads * config.head_dim
    if not projection:
        return output, 0, output
    return (config.hidden_size if config.family == "chatglm" else output), config.hidden_size, output


def new_prefix_encoder(config, pre_seq_len: int, projection: bool = False, seed: int = 0) -> PrefixEncoder:
    """A PrefixEncoder drawn as THUDM's torch modules start: the embedding N(0, 1) (nn.Embedding),
    each Linear's weight and bias U(-1/sqrt(in), 1/sqrt(in)) (nn.Linear's kaiming-uniform, a=sqrt(5))."""
    embedding, hidden, output = prefix_widths(config, projection)
    encoder = PrefixEncoder(pre_seq_len, embedding, output, hidden)
    rng = np.random.default_rng(seed)
    for name, param in encoder.parameters_and_names():
        if name == "embedding.weight":
            values = rng.standard_normal(param.shape)
        else:
            bound = 1.0 / np.sqrt(embedding if name.startswith("trans.0.") else hidden)
            values = rng.uniform(-bound, bound, param.shape)
        param.set_data(Tensor(values.astype(np.float32)))
        param.requires_grad = True      # Linear's weights are frozen base weights by default
    return encoder


def add_prefix(network, config, pre_seq_len: int, seed: int = 0, dropout: float = 0.0,
               projection: bool = False) -> PrefixEncoder:
    """Trainable P-Tuning v2 prefixes: every layer's attention gets the slices of a new
    PrefixEncoder's output (`new_prefix_encoder`), which is returned. The per-layer prefixes are
    the network's trainable parameters; a Trainer given the encoder trains the encoder's own
    (embedding, and the projection MLP with `projection`) through them."""
    encoder = new_prefix_encoder(config, pre_seq_len, projection, seed)
    apply_prefix(network, split_layers(encoder().asnumpy(), config.num_layers, config.kv_heads, config.head_dim),
                 trainable=True, dropout=dropout)
    return encoder


def prefix_cells(network) -> list:
    """Every PrefixAttention of `network`, layer by layer."""
    return [cell for _, cell in network.cells_and_names() if isinstance(cell, PrefixAttention)]


def write_prefixes(network, encoder: PrefixEncoder) -> None:
    """Set every layer's prefix to its slices of `encoder()` (in place: a compiled train step reads them)."""
    cells = prefix_cells(network)
    _, kv_heads, head_dim = cells[0].prefix_key.shape
    per_layer = split_layers(encoder().asnumpy(), len(cells), kv_heads, head_dim)
    for cell, (keys, values) in zip(cells, per_layer):
        ops.assign(cell.prefix_key, Tensor(keys, cell.prefix_key.dtype))
        ops.assign(cell.prefix_value, Tensor(values, cell.prefix_value.dtype))


def prefix_leaves(network) -> list:
    """The per-layer prefix Parameters in the encoder output's order: layer 0 keys, values, layer 1, ..."""
    return [p for cell in prefix_cells(network) for p in (cell.prefix_key, cell.prefix_value)]


class EncoderGradients(nn.Cell):
    """The chain rule through a PrefixEncoder, graph-compiled once: its parameters' gradients
    (parameters_and_names order) from those of the per-layer prefixes it outputs (prefix_leaves order)."""

    def __init__(self, encoder: PrefixEncoder):
        super().__init__()
        self.encoder = encoder
        self.weights = ms.ParameterTuple([p for _, p in encoder.parameters_and_names()])
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)

    @ms.jit
    def construct(self, rows_grad):
        return self.grad(self.encoder, self.weights)(rows_grad)

    def of(self, leaf_grads: list) -> list:
        """float32 numpy gradients of the encoder's parameters from the leaves' numpy gradients."""
        pairs = [np.stack(leaf_grads[i:i + 2], 1) for i in range(0, len(leaf_grads), 2)]  # [P, 2, kv, d] each
        rows = np.stack(pairs, 1).reshape(self.encoder.pre_seq_len, self.encoder.output_size)
        return [g.asnumpy().astype(np.float32) for g in self(Tensor(rows.astype(np.float32)))]


def prefix_length(network) -> int:
    """P of a network rewritten by apply_prefix, 0 for a plain one."""
    return max((cell.prefix_length for cell in prefix_cells(network)), default=0)


def fill_prefix_slots(network) -> None:
    """After setup_caches(): put every layer's prefix into the first P slots of each cache row."""
    for cell in prefix_cells(network):
        cell.fill_cache()


def prefixed_mask_inputs(prefix: int, key_valid, query_index, context_lengths) -> tuple:
    """The network's no-cache mask inputs (key_valid, query_first, query_last; layers.mask_inputs)
    on the [prefix | tokens] key axis: P always-valid keys first, queries and GLM v1's
    bidirectional context moved P keys on (numpy in, numpy out)."""
    key_valid, query_index = np.asarray(key_valid), np.asarray(query_index)
    context_lengths = np.asarray(context_lengths)
    if prefix:
        ones = np.ones((key_valid.shape[0], prefix), key_valid.dtype)
        key_valid, query_index, context_lengths = (np.concatenate([ones, key_valid], 1), query_index + prefix,
                                                   context_lengths + prefix)
    return mask_inputs(key_valid, query_index, context_lengths)
