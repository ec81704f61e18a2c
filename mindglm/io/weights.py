"""Reading any supported checkpoint as mindglm-named tensors, streamed one at a time.

Run-time library code (load_model uses it); the `ckpt_convert` CLI writes what this reads.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Callable, Iterator, Optional, Union

import numpy as np

from mindglm.checkpoint import (CheckpointError, Plan, build_target, detect_family, detect_source, packed_columns,
                                plan_to_mindglm, quantized_module, stored_quantization)
from mindglm.config import GLMConfig
from mindglm.io.sources import list_tensors
from mindglm.io.tensors import BufferPool, cast, parse_dtype, to_numpy
from mindglm.weight_formats import quantize_rows

ConfigArg = Union[GLMConfig, str, None]
Progress = Optional[Callable[[int, int, str, np.ndarray], None]]


def resolve_config(config: ConfigArg, src: str) -> tuple:
    """(GLMConfig or None, its config.json path or None): `config` itself, a config.json / model
    directory path, or else the config.json next to `src` when there is one."""
    if isinstance(config, GLMConfig):
        return config, None
    if config is None:
        folder = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
        if not os.path.isfile(os.path.join(folder, "config.json")):
            return None, None
        config = folder
    path = os.path.join(config, "config.json") if os.path.isdir(config) else config
    return GLMConfig.from_thudm(path), path


class _Conversion:
    """A planned conversion of `src`: its lazy tensors and the mindglm targets built from them."""

    def __init__(self, src: str, config: ConfigArg, need_config: bool):
        self.src = src
        self.config, self.config_path = resolve_config(config, src)
        self.tensors = {t.name: t for t in list_tensors(src)}
        shapes = {name: t.shape for name, t in self.tensors.items()}
        source = detect_source(shapes)
        if self.config is None and need_config and source != "mindglm":
            raise CheckpointError(f"no config.json found next to {src}: pass --config with the model's "
                                  "THUDM config.json (or its directory)")
        family = self.config.family if self.config is not None else detect_family(shapes)
        int_names = {name for name, t in self.tensors.items() if t.dtype.name == "int8"}
        # How the files store the matrices, whatever the model will be built as (the loader
        # quantizes float weights for a quantized model; see mindglm/loading.py).
        self.bits, self.output_quantized = stored_quantization(
            shapes, int_names, family, source, self.config.hidden_size if self.config is not None else None)
        stored = self.config
        if stored is not None:
            stored = dataclasses.replace(stored, quantization_bit=self.bits, quantize_output=self.output_quantized)
        self.plan: Plan = plan_to_mindglm(shapes, stored, source, family=family,
                                          config_source=self.config_path or "the model config")

    def quantizes(self, name: str, bits: int, quantize_output: bool) -> bool:
        """Does stream(quantize=bits) turn mindglm tensor `name` into int weights + scales?"""
        return bool(bits) and not self.bits and name.endswith(".weight") and \
            quantized_module(name[: -len(".weight")], quantize_output)

    def check_quantize(self, bits: int) -> None:
        if bits and self.bits and bits != self.bits:
            raise CheckpointError(f"{self.src} is already int{self.bits}-quantized; quantizing it to int{bits} "
                                  "would round twice: start from the fp16/bf16 weights")

    def specs(self, dtype: Optional[str] = None, bits: int = 0, quantize_output: bool = False) -> list:
        """(mindglm name, shape, dtype name) of every tensor stream() yields with these settings."""
        self.check_quantize(bits)
        out = []
        for target in self.plan.targets:
            source_dtype = self.tensors[target.pieces[0].source].dtype
            if self.quantizes(target.name, bits, quantize_output):
                rows, cols = target.shape
                out.append((target.name, (rows, packed_columns(cols, bits)), "int8"))
                out.append((target.name + "_scale", (rows,), "float16"))
                continue
            keep = not dtype or not source_dtype.is_float or target.name.endswith(".weight_scale")
            out.append((target.name, target.shape, source_dtype.name if keep else dtype))
        return out

    def stream(self, dtype: Optional[str] = None, reuse: bool = False, bits: int = 0,
               quantize_output: bool = False, mapped: bool = False) -> Iterator:
        """Yield (mindglm name, array cast to `dtype`) in plan order; bfloat16 stays uint16 bits.

        bits 8 or 4 quantizes the layers' float matrices THUDM's way (mindglm/weight_formats.py),
        each followed by its `.weight_scale` (fp16, like THUDM's, whatever `dtype` says).
        reuse=True hands out views of two reusable buffers (read, cast), each valid only until
        the next tensor: for consumers that write each array out before asking for the next.
        mapped=True hands out a tensor the file holds as is as a read-only memory map, read only
        where the consumer looks (a tensor-parallel rank keeping a slice).
        """
        self.check_quantize(bits)
        read_pool, cast_pool = (BufferPool(), BufferPool()) if reuse else (None, None)
        digests = {}
        tied = {p.target for p in self.plan.tied}
        for target in self.plan.targets:
            pool = read_pool if len(target.pieces) == 1 else None  # pieces are alive together
            arrays = [self.tensors[p.source].mapped() if mapped and len(target.pieces) == 1
                      else self.tensors[p.source].load(pool) for p in target.pieces]
            array = build_target(target, arrays, self.config)
            del arrays
            if target.name in tied:
                digests[target.name] = _digest(array)
            if self.quantizes(target.name, bits, quantize_output):
                q, scale = quantize_rows(to_numpy(array), bits)
                yield target.name, q
                yield target.name + "_scale", scale
            elif target.name.endswith(".weight_scale"):
                yield target.name, array
            else:
                yield target.name, cast(array, dtype, cast_pool)
            del array
        for piece in self.plan.tied:
            if _digest(self.tensors[piece.source].load(read_pool)) != digests[piece.target]:
                raise CheckpointError(f"'{piece.source}' differs from the embedding it should be tied to: "
                                      "mindglm ties ChatGLM-6B's output layer to its embedding, so this "
                                      "checkpoint cannot be converted faithfully")


def _digest(array: np.ndarray) -> tuple:
    data = memoryview(np.ascontiguousarray(array).reshape(-1)).cast("B")
    return array.dtype.str, array.shape, hashlib.blake2b(data, digest_size=16).digest()


def iter_mindglm_tensors(src_dir: str, config: ConfigArg = None, dtype: Optional[str] = None,
                         reuse: bool = False) -> Iterator:
    """Yield (mindglm name, numpy array) for every parameter of a checkpoint, one at a time.

    `src_dir` is a THUDM model directory (.bin or .safetensors, sharded or not) or a weight file
    (.bin, .safetensors, or a MindFormers / mindglm .ckpt); `config` a GLMConfig or config.json
    path (default: the config.json next to the weights). dtype None keeps float32/float16 and
    turns bfloat16 into float32 (numpy has no bfloat16); "bfloat16" rounds to bfloat16 values,
    returned as float32 arrays. reuse=True yields views of reusable buffers, each valid only
    until the next tensor is requested (much faster for a consumer that copies each array at
    once, e.g. into a MindSpore Parameter; never keep those arrays).
    """
    dtype = parse_dtype(dtype)
    pool = BufferPool() if reuse else None
    for name, array in _Conversion(src_dir, config, need_config=True).stream(dtype, reuse):
        yield name, to_numpy(array, pool)
