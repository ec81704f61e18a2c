"""A layer's steps around its matmuls on mindglm's CPU kernels (mindglm/kernels/fused.cc and
attention.cc), one call each.

In a decode step MindSpore's CPU runtime costs 5-8 us an op whatever the op's size, and a
ChatGLM2/3 layer has ~55 of them around its four matmuls: its two RMSNorms are five ops each and
the SwiGLU activation five more (two slices, sigmoid, two products). A chain of RMSNorms took
25-34 us a norm, of the fused one 9.5 us; on the `small` model, decode steps interleaved between
a fused and an unfused copy took int8 13.3 vs 14.7 ms, int4 12.2 vs 14.2. `fuse_layer_ops` swaps those
cells for ones calling one kernel each, after build and before loading, keeping every parameter
name (the norms' `weight`, the MLP's `up` / `down` cells move over as they are). The quantize
rewrite applies it once the Linear layers are on the kernels in float32 (mindglm/quantize.py).

The attention's qkv split and rotary (~17 ops a layer) and, in decode, its attention over the
cache (~12 more) become one call each too (KernelSelfAttention); prefill keeps MindSpore's
batched matmuls for the attention itself, which a long prompt needs. With them an int4 `small`
decode step runs ~120 MindSpore ops instead of ~330, and its graph call took 7.9 ms instead of 11.0.

Last, once the network is final (loaded, adapters applied: the engine's ModelRunner calls
`fuse_blocks` as it builds the cached step), a ChatGLM2/3 Block whose cells are all the fused ones
becomes a KernelBlock: its cached steps, prefill and decode, are two kernel calls around the KV
cache write (~46 ops a `small` decode step; graph call 9.1 -> 7.5 ms in one run, the Linear
kernels' own time unchanged at ~5 ms; the 6B model's 64-token prefill graph held +492 MB of op
outputs and compile state, now +222 MB).
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.ops import signature as sig

from mindglm.models.base import Block
from mindglm.models.glm2 import SwiGLU
from mindglm.models.layers import DotProductAttention, RMSNorm, SelfAttention
from mindglm.rewrite import replace_cells


def _kernel(name: str, out_shape, outputs: int = 1, inputs: int = 0, written=()):
    """The library's entry point `name` as an op; `written`: positions (of `inputs`) of Parameters
    the kernel writes in place, declared as MindSpore's own in-place ops declare their target
    (ScatterUpdate: a RW_WRITE signature and a memory side effect), so the compiler orders the
    writes against every read of those Parameters."""
    from mindglm.kernels.build import library_path
    out_dtype = ms.float32 if outputs == 1 else (ms.float32,) * outputs
    kind = ops.Custom
    if written:
        signature = tuple(sig.make_sig(f"x{i}", sig.sig_rw.RW_WRITE if i in written else sig.sig_rw.RW_READ)
                          for i in range(inputs))
        kind = type("WritingCustom", (ops.Custom,), {"__mindspore_signature__": signature})
    op = kind(f"{library_path()}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot")
    if written:
        op.add_prim_attr("side_effect_mem", True)
    return op


class KernelRMSNorm(RMSNorm):
    """RMSNorm (same `weight`, same eps) in one kernel call; float32 in, float32 out. Still an
    RMSNorm to the other rewrites (tensor parallelism reads the MLP's and norms' types)."""

    def __init__(self, norm: RMSNorm):
        nn.Cell.__init__(self)   # the parameter comes from `norm`, not from sizes
        self.weight = norm.weight
        self.eps = Tensor([norm.eps], ms.float32)
        self.op = _kernel("MindglmRmsNorm", lambda x, w, eps: x)

    def construct(self, x):
        hidden = x.shape[-1]
        y = self.op(x.reshape(-1, hidden), self.weight.astype(ms.float32), self.eps)
        return y.reshape(x.shape)


class KernelSwiGLU(SwiGLU):
    """down(silu(gate) * up) with the activation of the fused [gate | up] output in one kernel call;
    still a SwiGLU to the tensor-parallel rewrite, which splits the [gate | up] rows part by part."""

    def __init__(self, mlp: SwiGLU):
        nn.Cell.__init__(self)   # the layers come from `mlp`, not from a config
        self.ffn, self.up, self.down = mlp.ffn, mlp.up, mlp.down
        self.op = _kernel("MindglmSwiGLU", lambda x: [x[0], x[1] // 2])

    def construct(self, x):
        fused = self.up(x)
        active = self.op(fused.reshape(-1, 2 * self.ffn))
        return self.down(active.reshape(x.shape[:-1] + (self.ffn,)))


def signed_permutation(rotate_matrix: np.ndarray):
    """(partner, sign) with (x @ R)[j] = sign[j] * x[partner[j]], or None if R is not a signed
    permutation (one +-1 per column and per row, zeros elsewhere)."""
    nonzero = rotate_matrix != 0
    if not (nonzero.sum(0) == 1).all() or not (nonzero.sum(1) == 1).all():
        return None
    partner = nonzero.argmax(0)
    sign = rotate_matrix[partner, np.arange(rotate_matrix.shape[1])]
    if not (np.abs(sign) == 1).all():
        return None
    return partner.astype(np.int32), sign.astype(np.float32)


class KernelSelfAttention(SelfAttention):
    """SelfAttention whose qkv split + rotary is one kernel call, and whose decode step (one query
    per row, over the KV cache) reads the cache slots in one more; still a SelfAttention to the
    cache setup and the adapters. The qkv / dense layers and the core move over from `attention`."""

    def __init__(self, attention: SelfAttention, partner: np.ndarray, sign: np.ndarray):
        nn.Cell.__init__(self)   # the layers come from `attention`, not from a config
        for name in ("compute_dtype", "num_heads", "kv_heads", "head_dim", "q_size", "kv_size"):
            setattr(self, name, getattr(attention, name))
        self.qkv, self.dense, self.rotary, self.core = attention.qkv, attention.dense, attention.rotary, attention.core
        self.cache = attention.cache
        self.partner, self.sign = Tensor(partner, ms.int32), Tensor(sign, ms.float32)
        self.scales = Tensor([self.core.query_scale, self.core.score_scale], ms.float32)
        heads, kv_heads, dim = self.num_heads, self.kv_heads, self.head_dim
        self.rotate_op = _kernel("MindglmQkvRotary", lambda qkv, *tables: (
            [qkv[0], heads, dim], [qkv[0], kv_heads, dim], [qkv[0], kv_heads, dim]), outputs=3)
        self.attend_op = _kernel("MindglmCacheAttention", lambda q, *cache: q)

    def split_heads(self, x, cos, sin):
        """q [tokens, heads, dim], rotated k and v [tokens, kv_heads, dim] of x [batch, seq, hidden]."""
        width = cos.shape[-1]
        qkv = self.qkv(x)
        return self.rotate_op(qkv.reshape(-1, qkv.shape[-1]), cos.reshape(-1, width), sin.reshape(-1, width),
                              self.partner, self.sign)

    def project(self, x, cos, sin):
        batch, seq, _ = x.shape
        q, k, v = self.split_heads(x, cos, sin)
        return (q.reshape(batch, seq, self.num_heads, self.head_dim).transpose(0, 2, 1, 3),
                k.reshape(batch, seq, self.kv_heads, self.head_dim), v.reshape(batch, seq, self.kv_heads, self.head_dim))

    def construct(self, x, cos, sin, mask, slot_mapping=None, kv_slots=None):
        batch, seq, _ = x.shape
        if slot_mapping is None or seq != 1:   # shapes are static: one branch per compiled graph
            return super().construct(x, cos, sin, mask, slot_mapping, kv_slots)
        q, k, v = self.split_heads(x, cos, sin)
        keys, values = self.cache.write(k, v, slot_mapping)
        out = self.attend_op(q, keys, values, kv_slots, mask.reshape(batch, -1), self.scales)
        return self.dense(out.reshape(batch, 1, self.q_size))


def _fused_attention(attention: SelfAttention):
    """The attention's fused form, or None where the kernels do not apply (Ascend's flash core,
    a rotation other than a signed permutation)."""
    if type(attention.core) is not DotProductAttention:
        return None
    pairing = signed_permutation(attention.rotary.rotate_matrix.asnumpy())
    return None if pairing is None else KernelSelfAttention(attention, *pairing)


def fuse_layer_ops(network) -> list:
    """Replace the network's RMSNorm, SwiGLU and SelfAttention cells by their kernel forms; returns
    the paths."""
    fused = {RMSNorm: KernelRMSNorm, SwiGLU: KernelSwiGLU, SelfAttention: _fused_attention}
    # exact types: a fused cell stays as it is
    return replace_cells(network, lambda path, cell: fused[type(cell)](cell) if type(cell) in fused else None)


class KernelBlock(Block):
    """A ChatGLM2/3 Block whose steps with a KV cache are two kernel calls around the cache write
    (mindglm/kernels/block.cc): norm + qkv + rotary before it; after it, the attention over the
    cache slots, dense, residual, norm, MLP and residual. A layer runs 4 MindSpore ops a step,
    prefill or decode, instead of ~13 (decode) or ~25 (prefill). Without a cache (the exact full
    forward) it is the Block it replaced, cell by cell. Its cells stay where they were, parameter
    names and all. A network of KernelBlocks alone runs its cached step as one call instead
    (KernelStackStep), from the same operands."""

    def __init__(self, block: Block, attention: KernelSelfAttention):
        nn.Cell.__init__(self)   # the cells come from `block`, not from a config
        self.input_norm, self.attention = block.input_norm, block.attention
        self.post_attention_norm, self.mlp = block.post_attention_norm, block.mlp
        self.residual_from_norm, self.residual_scale = block.residual_from_norm, block.residual_scale
        # a P-Tuning PrefixAttention with a cache is its inner attention (the prefix sits in the cache)
        self.wrapped = attention is not block.attention
        from mindglm.quantize import FORMATS
        formats = [FORMATS.index(layer.fmt) for layer in (attention.qkv, attention.dense, self.mlp.up, self.mlp.down)]
        self.formats = Tensor(formats, ms.int32)
        self.qkv_format, self.mlp_formats = Tensor(formats[:1], ms.int32), Tensor(formats[1:], ms.int32)
        heads, kv_heads, dim = attention.num_heads, attention.kv_heads, attention.head_dim
        self.input_op = _kernel("MindglmAttentionInput", lambda h, *rest: (
            [h[0], heads, dim], [h[0], kv_heads, dim], [h[0], kv_heads, dim]), outputs=3)
        self.output_op = _kernel("MindglmLayerOutput", lambda q, keys, values, slots, allowed, scales, h, *rest: h)

    def kernel_attention(self) -> KernelSelfAttention:
        return self.attention.attention if self.wrapped else self.attention

    def input_operands(self) -> tuple:
        """The input block's norm weight and eps, and its qkv layer (weight, scale, bias)."""
        norm = self.input_norm
        return (float32_operand(norm.weight), norm.eps) + self.kernel_attention().qkv.kernel_operands()

    def mlp_operands(self) -> tuple:
        """The output block's dense layer, norm weight and eps, up and down layers."""
        norm = self.post_attention_norm
        return (self.kernel_attention().dense.kernel_operands() + (float32_operand(norm.weight), norm.eps) +
                self.mlp.up.kernel_operands() + self.mlp.down.kernel_operands())

    def stack_operands(self) -> tuple:
        """This layer's 20 arguments of MindglmNetworkStep (block.cc)."""
        attention = self.kernel_attention()
        return (self.input_operands() + (attention.cache.key, attention.cache.value, attention.scales, self.formats) +
                self.mlp_operands())

    def construct(self, h, cos, sin, mask, slot_mapping=None, kv_slots=None):
        if slot_mapping is None:
            return super().construct(h, cos, sin, mask)
        attention = self.kernel_attention()
        batch, seq, hidden = h.shape
        width = cos.shape[-1]
        rows = h.reshape(-1, hidden)
        q, k, v = self.input_op(rows, self.qkv_format, *self.input_operands(), cos.reshape(-1, width),
                                sin.reshape(-1, width), attention.partner, attention.sign)
        keys, values = attention.cache.write(k, v, slot_mapping)
        out = self.output_op(q, keys, values, kv_slots, mask.reshape(batch, seq, -1), attention.scales, rows,
                             self.mlp_formats, *self.mlp_operands())
        return out.reshape(batch, seq, hidden)


def _fused_block(block: Block):
    """The block's KernelBlock form, or None unless every cell of it is on the kernels (LoRA's
    cells, tensor-parallel shards, GLM v1's LayerNorm and GELU keep the Block)."""
    from mindglm.adapters.prefix import PrefixAttention
    from mindglm.quantize import WeightLinear

    attention = block.attention
    if type(attention) is PrefixAttention:
        attention = attention.attention
    if type(attention) is not KernelSelfAttention or block.residual_from_norm:
        return None
    if not (type(block.input_norm) is type(block.post_attention_norm) is KernelRMSNorm and type(block.mlp) is KernelSwiGLU):
        return None
    layers = (attention.qkv, attention.dense, block.mlp.up, block.mlp.down)
    if any(type(layer) is not WeightLinear or layer.backend != "kernels" for layer in layers):
        return None
    return KernelBlock(block, attention)


def fuse_blocks(network) -> list:
    """Replace every Block whose cells all run on the kernels by its KernelBlock; returns the paths.
    The last rewrite of an inference network, made when the engine builds its cached step: after
    loading and adapters (a P-Tuning prefix added to a loaded model, as a trainer does, is seen)."""
    return replace_cells(network, lambda path, cell: _fused_block(cell) if type(cell) is Block else None)


# MindglmNetworkStep's arguments (block.cc): 19 shared, then 20 a layer, the keys and values 5th and 6th.
STACK_SHARED, STACK_PER_LAYER, STACK_CACHE = 20, 20, (5, 6)


def float32_operand(tensor):
    """`tensor` as the kernels read it: float32 (a norm weight kept in a float16 checkpoint's dtype)."""
    return tensor if tensor.dtype == ms.float32 else tensor.astype(ms.float32)


def rounded_head(network) -> "Parameter | None":
    """A float32 kernel output layer's weights rounded to bfloat16, as int16 bits (KernelStackStep's
    greedy head); None for the other formats."""
    from mindglm.quantize import WeightLinear
    from mindglm.weight_formats import bfloat16_bits
    if not isinstance(network.output, WeightLinear) or network.output.fmt != "float32":
        return None
    weight = network.output.weight.asnumpy()
    rows = 4096   # a block at a time: no uint64 copy of the whole matrix
    bits = np.concatenate([bfloat16_bits(weight[i:i + rows]) for i in range(0, weight.shape[0], rows)])
    return Parameter(Tensor(bits.view(np.int16)), name="rounded_head", requires_grad=False)


class KernelStackStep(nn.Cell):
    """The engine's cached step (the inputs and result of ModelRunner's CompiledStep) for a network
    whose layers are all KernelBlocks: one kernel call (MindglmNetworkStep) from the step's token
    ids to its logits — the embedding rows, rotary rows and mask, every layer (each writing its KV
    cache itself), the final norm and the output layer. With logits_index [steps, rows] it decodes
    `steps` greedy steps in the call and returns (logits [steps * rows, vocab], the tokens each
    step was fed [steps, rows]): the engine's decode_steps.

    An op launched after a kernel that streamed its weights through the CPU caches finds
    MindSpore's runtime state evicted: with a stub kernel, a launch cost 57 us after 40 MB read
    against 7 us after 4 KB. A `small` decode step of KernelBlocks launched 33 ops among its
    layers (two kernels and two cache writes each) and spent ~1.2 ms between them; with the layers
    in one call the ~20 ops around them (embedding and rotary gathers, the mask's comparisons, the
    logits row gather, final norm, output layer) still cost ~0.5 ms (int8 `small` decode on a
    2-core Zen 5, five interleaved runs: graph call minus matmul time 2.2 -> 1.8 ms). What is left
    is the graph launch itself: with a stub kernel that only streams 640 MB, ~1.8 ms (1.3 with 8
    arguments instead of this call's 179) against 0.5 ms without the stream. The blocks and their cells stay as they are: the uncached forward, the adapters and the
    checkpoint see KernelBlocks.

    `rounded_head` (rounded_head(), for a float32 output layer): its weights in bfloat16, half its
    bytes, through which the greedy steps of a several-step call find each row's largest logit,
    reading float32 rows only where the copy cannot decide (the kernel's LinearArgmaxRows): the
    tokens of the full layer; those steps' logits are exact wherever they could be the largest and
    approximations below it elsewhere. One-step calls (prefill, sampling) use the full layer."""

    def __init__(self, network, rounded_head=None):
        super().__init__()
        from mindglm.quantize import FORMATS
        self.network = network
        attention = network.layers[0].kernel_attention()
        self.partner, self.sign = attention.partner, attention.sign
        embedding = {ms.float16: "float16", ms.float32: "float32"}[network.embedding.weight.dtype]
        self.formats = Tensor([FORMATS.index(embedding), FORMATS.index(network.output.fmt)], ms.int32)
        self.rounded_head = Tensor(np.zeros((1, 1), np.int16)) if rounded_head is None else rounded_head
        count, vocab = len(network.layers), network.output.out_features
        written = {STACK_SHARED + layer * STACK_PER_LAYER + i for layer in range(count) for i in STACK_CACHE}

        def output_shapes(*shapes):
            """logits [steps * n, vocab], fed [steps, n] of logits_index [n] or [steps, n]."""
            steps, rows = (1, shapes[7][0]) if len(shapes[7]) == 1 else shapes[7]
            return [steps * rows, vocab], [steps, rows]

        self.op = _kernel("MindglmNetworkStep", output_shapes, outputs=2,
                          inputs=STACK_SHARED + count * STACK_PER_LAYER, written=written)

    @ms.jit
    def construct(self, input_ids, position_ids, key_valid, query_first, query_last, slot_mapping, kv_slots,
                  logits_index):
        network = self.network
        final_norm, rotary = network.final_norm, network.rotary_table
        operands = ()
        for block in network.layers:
            operands = operands + block.stack_operands()
        logits, fed = self.op(input_ids, position_ids, key_valid, query_first, query_last, slot_mapping, kv_slots,
                              logits_index, self.formats, network.embedding.weight, rotary.cos_table,
                              rotary.sin_table, self.partner, self.sign, float32_operand(final_norm.weight),
                              final_norm.eps, *network.output.kernel_operands(), self.rounded_head, *operands)
        if logits_index.ndim == 1:   # one step, as CompiledStep
            return logits
        return logits, fed


def stackable(network) -> bool:
    """Whether `network` steps in one MindglmNetworkStep call: every layer a KernelBlock with the
    same rotary pairing (one call takes one partner / sign table for all of them), the final norm
    and the output layer on the kernels, the embedding float16 or float32."""
    from mindglm.quantize import WeightLinear
    layers = list(network.layers)
    if not layers or any(type(block) is not KernelBlock for block in layers):
        return False
    output = network.output
    if type(network.final_norm) is not KernelRMSNorm or type(output) is not WeightLinear or output.backend != "kernels":
        return False
    if network.embedding.weight.dtype not in (ms.float16, ms.float32):
        return False
    first = layers[0].kernel_attention()
    return all(np.array_equal(block.kernel_attention().partner.asnumpy(), first.partner.asnumpy()) and
               np.array_equal(block.kernel_attention().sign.asnumpy(), first.sign.asnumpy()) for block in layers)
