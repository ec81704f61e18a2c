"""A layer's element-wise steps on mindglm's CPU kernels (mindglm/kernels/fused.cc), one call each.

In a decode step MindSpore's CPU runtime costs 5-8 us an op whatever the op's size, and a
ChatGLM2/3 layer has ~55 of them around its four matmuls: its two RMSNorms are five ops each and
the SwiGLU activation five more (two slices, sigmoid, two products). A chain of RMSNorms took
25-34 us a norm, of the fused one 9.5 us; on the `small` model, decode steps interleaved between
a fused and an unfused copy took int8 13.3 vs 14.7 ms, int4 12.2 vs 14.2. `fuse_layer_ops` swaps those
cells for ones calling one kernel each, after build and before loading, keeping every parameter
name (the norms' `weight`, the MLP's `up` / `down` cells move over as they are). The quantize
rewrite applies it once the Linear layers are on the kernels in float32 (mindglm/quantize.py).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

from mindglm.models.glm2 import SwiGLU
from mindglm.models.layers import RMSNorm
from mindglm.rewrite import replace_cells


def _kernel(name: str, out_shape):
    from mindglm.kernels.build import library_path
    return ops.Custom(f"{library_path()}:{name}", out_shape=out_shape, out_dtype=ms.float32, func_type="aot")


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


def fuse_layer_ops(network) -> list:
    """Replace the network's RMSNorm and SwiGLU cells by their one-kernel forms; returns the paths."""
    fused = {RMSNorm: KernelRMSNorm, SwiGLU: KernelSwiGLU}   # exact types: a fused cell stays as it is
    return replace_cells(network, lambda path, cell: fused[type(cell)](cell) if type(cell) in fused else None)
