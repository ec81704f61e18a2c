"""Cells shared by every GLM family: linear layers, norms, rotary embedding, attention.

The families differ only in small, named ways (see glm.py and glm2.py); everything here is
written once. Matrices are stored [out_features, in_features] and multiplied with
`transpose_b=True`, which is the fast layout for MindSpore's CPU matmul and matches THUDM's
checkpoints, so conversion never transposes.
"""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from mindglm.config import DTYPES

MS_DTYPES = {name: getattr(ms, name) for name in DTYPES}  # config.DTYPES are MindSpore's own names
MASK_FILL = -1e9  # finite, so a fully masked (padding) row stays NaN-free; exp() of it is 0.0


def ms_dtype(name: str):
    """MindSpore dtype for a config dtype string."""
    return MS_DTYPES[name]


def _zeros(shape, dtype):
    """A parameter to be filled by a checkpoint; allocated lazily, in its own dtype."""
    return Parameter(initializer("zeros", shape, dtype), requires_grad=False)


class Linear(nn.Cell):
    """y = x W^T (+ b) with W stored [out, in]; any number of leading dims."""

    def __init__(self, in_features: int, out_features: int, bias: bool, param_dtype, compute_dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.weight = _zeros((out_features, in_features), param_dtype)
        self.bias = _zeros((out_features,), param_dtype) if bias else None
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        lead = x.shape[:-1]
        y = self.matmul(x.reshape(-1, self.in_features).astype(self.compute_dtype),
                        self.weight.astype(self.compute_dtype))
        if self.bias is not None:
            y = y + self.bias.astype(self.compute_dtype)
        return y.reshape(lead + (self.out_features,))

    def resized(self, in_features: int, out_features: int) -> "Linear":
        """A layer like this one with other sizes (a tensor-parallel shard)."""
        return Linear(in_features, out_features, self.bias is not None, self.weight.dtype, self.compute_dtype)


class Embedding(nn.Cell):
    """Token embedding table [vocab, hidden]; `logits()` is the output projection tied to it (GLM v1)."""

    def __init__(self, vocab_size: int, hidden_size: int, param_dtype):
        super().__init__()
        self.weight = _zeros((vocab_size, hidden_size), param_dtype)
        self.logits_matmul = ops.MatMul(transpose_b=True)

    def construct(self, input_ids):
        return ops.gather(self.weight, input_ids, 0)

    def resized(self, vocab_size: int) -> "Embedding":
        """A table like this one with `vocab_size` rows (a tensor-parallel shard)."""
        return Embedding(vocab_size, self.weight.shape[1], self.weight.dtype)

    def logits(self, h):
        """h [tokens, hidden] -> [tokens, vocab] = h E^T, in h's dtype."""
        return self.logits_matmul(h, self.weight.astype(h.dtype))


class RMSNorm(nn.Cell):
    """ChatGLM2/3 RMSNorm: statistics in float32, result in the input dtype."""

    def __init__(self, hidden_size: int, eps: float, param_dtype):
        super().__init__()
        self.eps = eps
        self.weight = _zeros((hidden_size,), param_dtype)

    def construct(self, x):
        x32 = x.astype(ms.float32)
        variance = (x32 * x32).mean(-1, keep_dims=True)
        normed = x32 * ops.rsqrt(variance + self.eps)
        return (self.weight.astype(ms.float32) * normed).astype(x.dtype)


class LayerNorm(nn.Cell):
    """ChatGLM-6B LayerNorm with bias, statistics in float32."""

    def __init__(self, hidden_size: int, eps: float, param_dtype):
        super().__init__()
        self.eps = eps
        self.weight = _zeros((hidden_size,), param_dtype)
        self.bias = _zeros((hidden_size,), param_dtype)

    def construct(self, x):
        x32 = x.astype(ms.float32)
        mean = x32.mean(-1, keep_dims=True)
        centered = x32 - mean
        variance = (centered * centered).mean(-1, keep_dims=True)
        normed = centered / ops.sqrt(variance + self.eps)
        return (normed * self.weight.astype(ms.float32) + self.bias.astype(ms.float32)).astype(x.dtype)


def norm_factory(config):
    """A function making the config's norm: RMSNorm (ChatGLM2/3) or LayerNorm with bias (ChatGLM-6B)."""
    norm = RMSNorm if config.rmsnorm else LayerNorm
    return lambda: norm(config.hidden_size, config.layernorm_epsilon, ms_dtype(config.param_dtype))


# ---------------------------------------------------------------------------------- rotary
def rotary_frequencies(rotary_pairs_dim: int, base: float) -> np.ndarray:
    """inv_freq_i = 1 / base^(2i / dim), i < dim/2, computed in float32 as the references do."""
    exponents = np.arange(0, rotary_pairs_dim, 2, dtype=np.float32) / np.float32(rotary_pairs_dim)
    return (np.float32(1.0) / np.power(np.float32(base), exponents, dtype=np.float32)).astype(np.float32)


def rotary_angle_table(max_positions: int, inv_freq: np.ndarray, position_scale: float = 1.0) -> np.ndarray:
    """Angles [max_positions, len(inv_freq)] = (position / position_scale) * inv_freq, float32."""
    positions = np.arange(max_positions, dtype=np.float32)
    if position_scale != 1.0:
        positions = positions / np.float32(position_scale)
    return np.outer(positions, inv_freq).astype(np.float32)


def rotate_interleaved_matrix(dims: int) -> np.ndarray:
    """R with (x @ R) = [-x1, x0, -x3, x2, ...]: rotation of interleaved pairs (ChatGLM2/3)."""
    rot = np.zeros((dims, dims), np.float32)
    for i in range(0, dims, 2):
        rot[i + 1, i] = -1.0
        rot[i, i + 1] = 1.0
    return rot


def rotate_half_matrix(dims: int) -> np.ndarray:
    """R with (x @ R) = [-x2, x1] for x = [x1, x2] (NeoX "rotate half")."""
    half = dims // 2
    rot = np.zeros((dims, dims), np.float32)
    for i in range(half):
        rot[i + half, i] = -1.0
        rot[i, i + half] = 1.0
    return rot


class Rotary(nn.Cell):
    """Rotary position embedding applied to the first `rotary_dims` of each head.

    The caller supplies per-token cos/sin of shape [batch, seq, 1, rotary_dims] already laid out
    for its pairing convention, and `rotate_matrix` (rotary_dims x rotary_dims, entries 0/+-1)
    that realises the pairing: x*cos + (x @ R)*sin. One code path thus serves ChatGLM2/3's
    interleaved pairs and ChatGLM-6B's two rotate-half halves; the matmul by a signed
    permutation is exact in floating point.
    """

    def __init__(self, rotary_dims: int, head_dim: int, rotate_matrix: np.ndarray):
        super().__init__()
        self.rotary_dims, self.head_dim = rotary_dims, head_dim
        self.rotate_matrix = Tensor(rotate_matrix, ms.float32)

    def construct(self, x, cos, sin):
        """x: [batch, seq, heads, head_dim]."""
        if self.rotary_dims == self.head_dim:
            rotated, passthrough = x, None
        else:
            rotated, passthrough = x[..., : self.rotary_dims], x[..., self.rotary_dims:]
        turned = ops.matmul(rotated, self.rotate_matrix.astype(x.dtype))
        out = rotated * cos.astype(x.dtype) + turned * sin.astype(x.dtype)
        if passthrough is None:
            return out
        return ops.concat((out, passthrough), -1)


# ---------------------------------------------------------------------------------- attention
def attention_mask(key_valid, query_first, query_last):
    """Boolean [batch, 1, queries, keys]: may query s of row b attend to key k?

    key_valid [batch, keys] marks real (written, non-padding) keys; query s sees the keys
    query_first[b, s] .. query_last[b, s] of its row's key axis. Causal attention is
    query_last = the query's own index (`last_visible_key` adds GLM v1's bidirectional context);
    query_first > 0 lets one row hold several sequences, each query seeing its own only.
    """
    key_index = ops.arange(key_valid.shape[1], dtype=ms.int32).reshape(1, 1, -1)
    in_range = ops.logical_and(key_index >= query_first.astype(ms.int32).expand_dims(-1),
                               key_index <= query_last.astype(ms.int32).expand_dims(-1))
    allowed = ops.logical_and(in_range, key_valid.astype(ms.bool_).expand_dims(1))
    return allowed.expand_dims(1)


def last_visible_key(query_index, context_length) -> np.ndarray:
    """The last key each query may see (numpy): the query itself, or for a query inside GLM v1's
    bidirectional context (keys < context_length; 0 for ChatGLM2/3) the context's last key.
    query_index [..., queries] is on the key axis; context_length has its leading shape."""
    query_index, context_length = np.asarray(query_index), np.asarray(context_length)
    if context_length.ndim:
        context_length = context_length[..., None]
    return np.maximum(query_index, context_length - 1)


def mask_inputs(key_valid, query_index, context_lengths) -> tuple:
    """(key_valid, query_first, query_last) of a batch with one sequence per row."""
    query_last = last_visible_key(query_index, context_lengths)
    return np.asarray(key_valid), np.zeros_like(query_last), query_last


class DotProductAttention(nn.Cell):
    """softmax(q k^T * scale) v in float32, grouped-query aware, without repeating k/v heads.

    q: [batch, heads, queries, dim]; k, v: [batch, kv_heads, keys, dim];
    mask: bool [batch, 1, queries, keys]. The `heads // kv_heads` query heads that share a
    key/value head are folded into the query axis, so one batched matmul serves them all.
    `score_scale` multiplies the float32 scores (GLM v1's layer-number coefficient).
    """

    def __init__(self, num_heads: int, kv_heads: int, head_dim: int, query_scale: float,
                 score_scale: float = 1.0):
        super().__init__()
        self.num_heads, self.kv_heads, self.head_dim = num_heads, kv_heads, head_dim
        self.group_size = num_heads // kv_heads
        self.query_scale, self.score_scale = query_scale, score_scale
        self.qk_matmul = ops.BatchMatMul(transpose_b=True)
        self.pv_matmul = ops.BatchMatMul()

    def construct(self, q, k, v, mask):
        batch, _, queries, _ = q.shape
        keys = k.shape[2]
        q = (q * self.query_scale).reshape(batch, self.kv_heads, self.group_size * queries, self.head_dim)
        scores = self.qk_matmul(q, k).astype(ms.float32)
        scores = scores.reshape(batch, self.kv_heads, self.group_size, queries, keys)
        if self.score_scale != 1.0:
            scores = scores * self.score_scale
        scores = ops.masked_fill(scores, ops.logical_not(mask.expand_dims(1)), MASK_FILL)
        probs = ops.softmax(scores, -1).astype(v.dtype)
        probs = probs.reshape(batch, self.kv_heads, self.group_size * queries, keys)
        out = self.pv_matmul(probs, v)
        return out.reshape(batch, self.num_heads, queries, self.head_dim)


class FlashAttention(nn.Cell):
    """Ascend's fused kernels behind the DotProductAttention interface (same inputs, same output).

    Prefill (several queries): `ops.flash_attention_score`; decode (one query):
    `ops.incre_flash_attention`. Both take BNSD tensors ([batch, heads, seq, dim]), grouped kv
    heads natively (`num_key_value_heads`), one combined scale, and a mask whose True/1 means
    *discard* — the opposite of mindglm's boolean "may attend" mask. `kernel_call()` builds the
    call without running it, so the argument layout is tested on machines without an NPU.
    """

    def __init__(self, num_heads: int, kv_heads: int, head_dim: int, query_scale: float,
                 score_scale: float = 1.0):
        super().__init__()
        self.num_heads, self.kv_heads, self.head_dim = num_heads, kv_heads, head_dim
        # The reference's split of the scale (GLM v1's layer-number trick) only guards fp16
        # overflow; the kernels accumulate in float32, so the product is the same function.
        self.scale = float(query_scale * score_scale)

    def kernel_call(self, q, k, v, mask):
        """(kernel, positional args, keyword args) for q [B,N,S,D], k/v [B,kvN,K,D], mask [B,1,S,K]."""
        discard = ops.logical_not(mask).astype(ms.uint8)
        if q.shape[2] == 1:
            # Per-row key counts let the kernel skip each cache row's unused tail of the window:
            # the index of the row's last admitted key, plus one.
            key_number = ops.arange(1, mask.shape[-1] + 1, dtype=ms.int32)
            lengths = ops.amax(mask[:, 0, 0, :].astype(ms.int32) * key_number, -1)
            return (ops.incre_flash_attention, (q, k, v),
                    dict(attn_mask=discard, actual_seq_lengths=lengths, num_heads=self.num_heads,
                         input_layout="BNSD", scale_value=self.scale, num_key_value_heads=self.kv_heads))
        return (ops.flash_attention_score, (q, k, v, self.num_heads),
                dict(attn_mask=discard, scalar_value=self.scale, input_layout="BNSD", sparse_mode=0))

    def construct(self, q, k, v, mask):
        kernel, args, kwargs = self.kernel_call(q, k, v, mask)
        return kernel(*args, **kwargs)


def attention_core(config, query_scale: float, score_scale: float = 1.0) -> nn.Cell:
    """The attention core for this build: Ascend's fused kernels when asked for and available,
    the portable float32-softmax path everywhere else."""
    core = FlashAttention if use_flash_attention(config) else DotProductAttention
    return core(config.num_attention_heads, config.kv_heads, config.head_dim, query_scale, score_scale)


def use_flash_attention(config, device_target: str = None) -> bool:
    """True when the config asks for flash attention and MindSpore targets Ascend."""
    if not config.use_flash_attention:
        return False
    device_target = device_target or ms.get_context("device_target")
    return device_target == "Ascend"


class SelfAttention(nn.Cell):
    """Fused qkv projection, rotary, attention core, output projection.

    The qkv weight rows are [q of all heads | k of all kv heads | v of all kv heads]; GLM v1's
    per-head interleaved rows are regrouped at conversion so both families share this Cell.
    Given `slot_mapping` and `kv_slots`, new keys/values are written at their slots in the
    attached KVCache and attention runs over the cache slots `kv_slots` names for each row;
    otherwise over the current chunk alone.
    """

    def __init__(self, config, rotary: Rotary, query_scale: float, score_scale: float = 1.0):
        super().__init__()
        param_dtype = ms_dtype(config.param_dtype)
        self.compute_dtype = ms_dtype(config.compute_dtype)
        self.num_heads, self.kv_heads, self.head_dim = (config.num_attention_heads, config.kv_heads,
                                                        config.head_dim)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.kv_heads * self.head_dim
        # THUDM's rule: the fused qkv has a bias when either switch asks for one
        self.qkv = Linear(config.hidden_size, self.q_size + 2 * self.kv_size,
                          config.add_qkv_bias or config.add_bias_linear,
                          param_dtype, self.compute_dtype)
        self.dense = Linear(self.q_size, config.hidden_size, config.add_bias_linear, param_dtype,
                            self.compute_dtype)
        self.rotary = rotary
        self.cache = None  # a KVCache once setup_caches() attaches one
        self.core = attention_core(config, query_scale, score_scale)

    def project(self, x, cos, sin):
        """q [batch, heads, seq, dim] and rotated k, v [batch, seq, kv_heads, dim] of x [batch, seq, hidden]."""
        batch, seq, _ = x.shape
        qkv = self.qkv(x)
        q = qkv[..., : self.q_size].reshape(batch, seq, self.num_heads, self.head_dim)
        k = qkv[..., self.q_size: self.q_size + self.kv_size].reshape(batch, seq, self.kv_heads, self.head_dim)
        v = qkv[..., self.q_size + self.kv_size:].reshape(batch, seq, self.kv_heads, self.head_dim)
        return self.rotary(q, cos, sin).transpose(0, 2, 1, 3), self.rotary(k, cos, sin), v

    def attend(self, q, k, v, mask):
        """The attention core over k, v [batch, kv_heads, keys, dim], then the output projection."""
        batch, _, seq, _ = q.shape
        out = self.core(q, k, v, mask)
        return self.dense(out.transpose(0, 2, 1, 3).reshape(batch, seq, self.q_size))

    def construct(self, x, cos, sin, mask, slot_mapping=None, kv_slots=None):
        q, k, v = self.project(x, cos, sin)
        if slot_mapping is not None:
            k, v = self.cache.update(k, v, slot_mapping, kv_slots)
        else:
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        return self.attend(q, k, v, mask)


def default_query_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
