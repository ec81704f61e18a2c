"""The weight-format rewrite: Linear cells -> WeightLinear cells holding int8 / int4 / fp16
(or float32) matrices, each multiplied by the backend chosen once, at build time.

    network = build_network(config)
    quantize_network(network, config)   # before loading: the cells are the loading schema
    load_weights(network, tensors)      # float weights are quantized (THUDM's way) on the fly

Backends, like the attention core (models/layers.py `attention_core`):
- CPU: C++ kernels (mindglm/kernels) through `ops.Custom(func_type="aot")`, dequantization
  fused into the dot product; fp16 and fp32 matrices get the same kernels (MindSpore's CPU
  MatMul has no fast fp16 path and runs well below memory speed on large fp32 matrices).
- Ascend: `WeightQuantBatchMatmul` (int8 [N, K] with transpose_weight; int4 repacked at load
  to its [K, N/2] layout, packed along N, low nibble first). `kernel_call()` builds the call
  without running it, so the argument layout is tested on machines without an NPU.
- portable (GPU, or CPU without a compiler): dequantize in the graph + MatMul. Exact.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from mindglm.checkpoint import CheckpointError, packed_columns, quantized_module
from mindglm.config import ConfigError
from mindglm.fused import fuse_layer_ops
from mindglm.loading import copy_into
from mindglm.models.layers import Linear, ms_dtype
from mindglm.rewrite import replace_cells
from mindglm.runtime import one_thread_for_mindspore_ops
from mindglm.weight_formats import pack_int4_along_n, quantize_rows, unpack_int4

# The index of a format here is its code in the fused layer kernels (mindglm/kernels/layer.h Format).
FORMATS = ("int8", "int4", "float16", "float32")
_STORAGE = {"int8": ms.int8, "int4": ms.int8, "float16": ms.float16, "float32": ms.float32}
_KERNELS = {"int8": "MatmulInt8", "int4": "MatmulInt4", "float16": "MatmulF16", "float32": "MatmulF32"}


def _zeros(shape, dtype):
    return Parameter(initializer("zeros", shape, dtype), requires_grad=False)


# ---------------------------------------------------------------------------------- backends
class KernelMatmul(nn.Cell):
    """mindglm's C++ CPU kernels: y = (x @ w^T) * scale + bias, float32, weights never widened."""

    def __init__(self, fmt: str, has_scale: bool, has_bias: bool):
        super().__init__()
        from mindglm.kernels.build import library_path
        self.op = ops.Custom(f"{library_path()}:{_KERNELS[fmt]}", out_shape=lambda x, w, *rest: [x[0], w[0]],
                             out_dtype=ms.float32, func_type="aot")
        self.has_scale, self.has_bias = has_scale, has_bias

    def construct(self, x, weight, scale, bias):
        if self.has_scale and self.has_bias:
            return self.op(x, weight, scale, bias)
        if self.has_scale:
            return self.op(x, weight, scale)
        if self.has_bias:
            return self.op(x, weight, bias)
        return self.op(x, weight)


class PortableMatmul(nn.Cell):
    """Dequantize in the graph (q * scale in float32), then MindSpore's MatMul: runs anywhere."""

    def __init__(self, fmt: str, has_scale: bool, has_bias: bool):
        super().__init__()
        self.fmt, self.has_scale, self.has_bias = fmt, has_scale, has_bias
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x, weight, scale, bias):
        w = weight.astype(ms.float32)
        if self.fmt == "int4":
            # byte = 16 * high + (low mod 16); high is the even column, low the odd one (signed).
            high = ops.floor(w / 16.0)
            low = w - 16.0 * high
            low = low - 16.0 * (low >= 8.0).astype(ms.float32)
            w = ops.stack((high, low), -1).reshape(weight.shape[0], -1)
        if self.has_scale:
            w = w * scale.reshape(-1, 1)
        y = self.matmul(x, w)
        if self.has_bias:
            y = y + bias
        return y


class AscendMatmul(nn.Cell):
    """Ascend's WeightQuantBatchMatmul: antiquant scale per output channel, in the compute dtype."""

    def __init__(self, fmt: str, has_scale: bool, has_bias: bool, compute_dtype=ms.float16):
        super().__init__()
        if fmt not in ("int8", "int4"):
            raise ConfigError(f"Ascend's weight-quant matmul takes int8/int4 weights, not {fmt}")
        self.fmt, self.has_bias, self.compute_dtype = fmt, has_bias, compute_dtype
        # int8 stays THUDM's [N, K] (transpose_weight); int4 is stored [K, N/2] (see prepare()).
        self.transpose_weight = fmt == "int8"

    def kernel_call(self, x, weight, scale, bias):
        """(kernel, positional args, keyword args) for x [M, K]; nothing runs."""
        x = x.astype(self.compute_dtype)
        args = (x, weight, scale.astype(self.compute_dtype))
        kwargs = dict(antiquant_offset=None, quant_scale=None, quant_offset=None,
                      bias=bias.astype(self.compute_dtype) if self.has_bias else None,
                      transpose_x=False, transpose_weight=self.transpose_weight, antiquant_group_size=0)
        return ops.auto_generate.weight_quant_batch_matmul, args, kwargs

    def construct(self, x, weight, scale, bias):
        kernel, args, kwargs = self.kernel_call(x, weight, scale, bias)
        return kernel(*args, **kwargs).astype(ms.float32)


BACKENDS = {"kernels": KernelMatmul, "portable": PortableMatmul, "ascend": AscendMatmul}


# ---------------------------------------------------------------------------------- the cell
class WeightLinear(nn.Cell):
    """y = x W^T (+ b) with W [out, in] stored as int8, int4 (THUDM-packed), float16 or float32.

    Parameters: `weight` (the format's storage), `weight_scale` float32 [out] for int formats
    (THUDM's fp16 scales, widened exactly), `bias` float32 [out]. `load_parameter` fills them
    from checkpoint tensors: float weights are quantized the THUDM way, int ones copied.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: str, backend: str,
                 compute_dtype=ms.float32):
        super().__init__()
        if fmt not in FORMATS:
            raise ConfigError(f"unknown weight format {fmt!r}; expected one of {FORMATS}")
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.backend, self.compute_dtype = fmt, backend, compute_dtype
        self.bits = {"int8": 8, "int4": 4}.get(fmt, 0)
        cols = packed_columns(in_features, self.bits) if self.bits else in_features
        shape = (out_features, cols)
        if backend == "ascend" and fmt == "int4":
            shape = (in_features, out_features // 2)
        self.weight = _zeros(shape, _STORAGE[fmt])
        self.weight_scale = _zeros((out_features,), ms.float32) if self.bits else None
        self.bias = _zeros((out_features,), ms.float32) if bias else None
        if backend == "kernels":  # what kernel_operands() passes for a missing scale / bias
            self.unit_scale = Tensor(np.ones(out_features, np.float32))
            self.zero_bias = Tensor(np.zeros(out_features, np.float32))
        if backend == "ascend":
            self.matmul = AscendMatmul(fmt, self.bits > 0, bias, compute_dtype)
        else:
            self.matmul = BACKENDS[backend](fmt, self.bits > 0, bias)

    def kernel_operands(self) -> tuple:
        """(weight, scale, bias) as the fused layer kernels take every layer (mindglm/fused.py
        KernelBlock): a unit scale and a zero bias stand in for those this layer has not."""
        return (self.weight, self.unit_scale if self.weight_scale is None else self.weight_scale,
                self.zero_bias if self.bias is None else self.bias)

    def construct(self, x):
        lead = x.shape[:-1]
        y = self.matmul(x.reshape(-1, self.in_features).astype(ms.float32), self.weight, self.weight_scale,
                        self.bias)
        return y.reshape(lead + (self.out_features,)).astype(self.compute_dtype)

    def resized(self, in_features: int, out_features: int) -> "WeightLinear":
        """A layer of the same format and backend with other sizes (a tensor-parallel shard)."""
        return WeightLinear(in_features, out_features, self.bias is not None, self.fmt, self.backend,
                            self.compute_dtype)

    # ------------------------------------------------------------------ loading
    def load_parameter(self, local: str, array: np.ndarray, name: str) -> list:
        """Fill from checkpoint tensor `name` (`local`: weight, weight_scale or bias); returns the
        local names of the parameters it filled."""
        if local == "bias":
            copy_into(self.bias, array, name)
            return ["bias"]
        if local == "weight_scale":
            if not self.bits:
                raise CheckpointError(f"'{name}' is a quantization scale but the model stores this layer as {self.fmt}")
            copy_into(self.weight_scale, array, name)
            return ["weight_scale"]
        if local != "weight":
            raise CheckpointError(f"'{name}' has no place in a quantized linear layer")
        if array.dtype == np.int8:
            return self._load_quantized(array, name)
        if self.bits:  # float weights into an int layer: quantize the THUDM way
            q, scale = quantize_rows(array, self.bits)
            self._store_int(q, name)
            copy_into(self.weight_scale, scale, name)
            return ["weight", "weight_scale"]
        copy_into(self.weight, array, name)
        return ["weight"]

    def _load_quantized(self, array, name) -> list:
        if not self.bits:
            raise CheckpointError(f"'{name}' is int8 (a quantized checkpoint) but the model stores this layer as "
                                  f"{self.fmt}: load it with its quantization_bit, or convert the fp weights")
        want = (self.out_features, packed_columns(self.in_features, self.bits))
        if tuple(array.shape) != want:
            other = {8: 4, 4: 8}[self.bits]
            hint = (f"; that is the int{other} shape: the checkpoint is int{other}"
                    if tuple(array.shape) == (self.out_features, packed_columns(self.in_features, other)) else "")
            raise CheckpointError(f"'{name}' has shape {tuple(array.shape)}, an int{self.bits} layer of "
                                  f"[{self.out_features}, {self.in_features}] stores {want}{hint}")
        self._store_int(array, name)
        return ["weight"]

    def _store_int(self, q, name):
        if self.backend == "ascend" and self.fmt == "int4":
            q = pack_int4_along_n(unpack_int4(q))
        copy_into(self.weight, q, name)


# ---------------------------------------------------------------------------------- policy
def linear_backend(config, device_target: str = None) -> str:
    """'kernels', 'portable' or 'ascend' for this build."""
    device_target = device_target or ms.get_context("device_target")
    if config.linear_backend == "portable":
        return "portable"
    if device_target == "Ascend":
        return "ascend"
    if device_target == "CPU":
        return "kernels"
    return "portable"


def linear_format(config, module: str, backend: str):
    """The storage format of Linear `module` ('layers.0.mlp.up', 'output') under `backend`, or None
    to keep MindSpore's Linear."""
    if config.quantization_bit and quantized_module(module, config.quantize_output):
        return f"int{config.quantization_bit}"
    dtype = config.weight_dtype or config.param_dtype
    if backend == "kernels":
        # fp16 weights always take the kernel: MindSpore's CPU MatMul would widen them to a float32
        # copy per call. fp32 ones when asked ("kernels"), or once the model needs the kernels
        # anyway (an int8 model's fp32 output layer is most of its step through MatMul); a plain
        # fp32 model keeps MatMul, which is exact and needs no compiler.
        needs_kernels = config.quantization_bit or dtype == "float16" or config.linear_backend == "kernels"
        if dtype in ("float16", "float32") and needs_kernels:
            return dtype
        return None
    if backend == "portable" and config.weight_dtype == "float16":
        return "float16"
    return None  # Ascend's own MatMul is fast in fp16; only int formats need its fused op


def quantize_network(network, config, device_target: str = None) -> list:
    """Rewrite `network`'s Linear cells to the formats `config` asks for; returns their paths."""
    backend = linear_backend(config, device_target)
    compute_dtype = ms_dtype(config.compute_dtype)

    def make(path, cell):
        if not isinstance(cell, Linear):
            return None
        fmt = linear_format(config, path, backend)
        if fmt is None:
            return None
        return WeightLinear(cell.in_features, cell.out_features, cell.bias is not None, fmt, backend,
                            compute_dtype)

    replaced = replace_cells(network, make)
    if replaced and backend == "kernels":
        if compute_dtype == ms.float32:   # the fused kernels are float32, like the Linear ones
            fuse_layer_ops(network)
        one_thread_for_mindspore_ops()
    return replaced
