"""The conversions: any supported checkpoint -> mindglm tensors -> MindSpore .ckpt or THUDM
safetensors. Each is planned from names and shapes first (so a wrong config, a missing tensor or
a corrupt file fails before anything is written), then streamed one tensor at a time.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Optional

import numpy as np

from mindglm.checkpoint import CheckpointError, thudm_name, to_thudm
from mindglm.io.ms_ckpt import CkptWriter
from mindglm.io.safetensors_io import split_shards, write_safetensors
from mindglm.io.tensors import DTYPES, parse_dtype
from mindglm.io.weights import ConfigArg, Progress, _Conversion
from mindglm.config import TOKENIZER_FILES
from mindglm.weight_formats import FORMATS

DEFAULT_SHARD_BYTES = 2 * 1024 ** 3

def quantize_bits(quantize: Optional[str]) -> int:
    """--quantize int8 / int4 -> 8 / 4 (None -> 0)."""
    if quantize is None:
        return 0
    if quantize not in FORMATS:
        raise CheckpointError(f"--quantize {quantize!r}: expected one of {', '.join(FORMATS)}")
    return FORMATS[quantize]


def convert(src: str, dst: str, dtype: Optional[str] = None, config: ConfigArg = None,
            progress: Progress = None, quantize: Optional[str] = None, quantize_output: bool = False) -> dict:
    """Convert a checkpoint (see `iter_mindglm_tensors`) into a mindglm MindSpore .ckpt at `dst`.

    dtype: None keeps each tensor's source dtype (bfloat16 stays bfloat16); "float32", "float16"
    or "bfloat16" casts every float tensor. quantize: "int8" / "int4" quantizes the layers'
    matrices THUDM's way (`quantize_output`: the output layer too), each with its fp16
    `.weight_scale`. Written to `dst + '.tmp'` and renamed at the end, so no partial file is
    ever left behind. Returns {"tensors", "bytes", "seconds"}.
    """
    dtype = parse_dtype(dtype)
    bits = quantize_bits(quantize)
    if not dst.endswith(".ckpt"):
        raise CheckpointError(f"--dst {dst} should be a file name ending in .ckpt")
    if os.path.isdir(dst):
        raise CheckpointError(f"--dst {dst} is a directory; give a file name such as {dst}/model.ckpt")
    start = time.perf_counter()
    conversion = _Conversion(src, config, need_config=True)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    total = len(conversion.specs(dtype, bits, quantize_output))
    with CkptWriter(dst) as writer:
        for i, (name, array) in enumerate(conversion.stream(dtype, reuse=True, bits=bits,
                                                            quantize_output=quantize_output)):
            writer.write(name, array)
            if progress:
                progress(i + 1, total, name, array)
            del array
    return {"tensors": writer.tensors, "bytes": writer.bytes, "seconds": time.perf_counter() - start}


def convert_to_hf(src: str, dst_dir: str, config: ConfigArg = None, dtype: Optional[str] = None,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: Progress = None,
                  quantize: Optional[str] = None, quantize_output: bool = False) -> dict:
    """Write a checkpoint (normally a mindglm .ckpt) as THUDM-named safetensors shards in `dst_dir`.

    Produces model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json,
    plus a copy of the config.json used (`config` as a path, or the one next to `src`; without
    one it refuses, since a THUDM directory cannot load without it) and of the tokenizer files
    found next to `src` or the config (so the directory is complete for transformers and mindglm).
    ChatGLM-6B needs the config (its qkv layout); for ChatGLM2/3 it is optional and, when given,
    checks every shape. v1's tied lm_head.weight is not written (THUDM's model ties it on load).
    A quantized checkpoint (or `quantize`) is written in THUDM's int8/int4 format, with
    `quantization_bit` set in the config.json written next to it.
    Files go to `dst_dir + '.tmp'` and move into `dst_dir` only when all of them are complete.
    """
    dtype = parse_dtype(dtype)
    bits = quantize_bits(quantize)
    start = time.perf_counter()
    conversion = _Conversion(src, config, need_config=False)
    plan, cfg = conversion.plan, conversion.config
    # the config of what is written: to_thudm checks each tensor's shape against it
    written = cfg and dataclasses.replace(cfg, quantization_bit=bits or conversion.bits,
                                          quantize_output=quantize_output or conversion.output_quantized)
    if cfg is None and plan.family == "chatglm":
        raise CheckpointError("a ChatGLM-6B checkpoint needs --config (its config.json) to write THUDM's "
                              "per-head qkv layout")
    if conversion.config_path is None:
        raise CheckpointError(f"no config.json next to {src}: a THUDM model directory needs one to load; pass "
                              "--config with the model's THUDM config.json (or its directory)")
    specs = [(thudm_name(name, plan.family), shape, dt)
             for name, shape, dt in conversion.specs(dtype, bits, quantize_output)]
    shards = split_shards(specs, max_shard_bytes)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    out_bytes = sum(int(np.prod(shape, dtype=np.int64)) * DTYPES[dt].itemsize for _, shape, dt in specs)

    def thudm_arrays():
        stream = conversion.stream(dtype, reuse=True, bits=bits, quantize_output=quantize_output)
        for i, (name, array) in enumerate(stream):
            (thudm, out), = to_thudm(name, array, written, plan.family)
            if progress:
                progress(i + 1, len(specs), thudm, out)
            yield out

    tmp_dir = dst_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    try:
        arrays = thudm_arrays()
        for shard_name, shard in zip(names, shards):
            write_safetensors(os.path.join(tmp_dir, shard_name), shard, arrays)
        for _ in arrays:  # the end of the stream runs the tied-embedding check
            pass
        if len(shards) > 1:
            weight_map = {spec[0]: shard_name for shard_name, shard in zip(names, shards) for spec in shard}
            with open(os.path.join(tmp_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
                json.dump({"metadata": {"total_size": out_bytes}, "weight_map": weight_map}, fh, indent=2)
        _write_config(conversion.config_path, os.path.join(tmp_dir, "config.json"), bits or conversion.bits,
                      plan.family)
        for name in _tokenizer_files(src, conversion.config_path):
            shutil.copyfile(name, os.path.join(tmp_dir, os.path.basename(name)))
        os.makedirs(dst_dir, exist_ok=True)
        for name in os.listdir(tmp_dir):
            os.replace(os.path.join(tmp_dir, name), os.path.join(dst_dir, name))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return {"tensors": len(specs), "bytes": out_bytes, "shards": len(shards),
            "seconds": time.perf_counter() - start}


# What a THUDM model directory holds besides weights and config.json.
_TOKENIZER_NAMES = tuple(sorted(set(TOKENIZER_FILES.values()))) + ("tokenizer_config.json",)


def _tokenizer_files(src: str, config_path: str) -> list:
    """Tokenizer files beside `src` (first) or beside its config.json, one of each name."""
    found = {}
    for folder in (src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src)),
                   os.path.dirname(os.path.abspath(config_path))):
        for name in _TOKENIZER_NAMES:
            path = os.path.join(folder, name)
            if name not in found and os.path.isfile(path):
                found[name] = path
    return list(found.values())


def _write_config(src: str, dst: str, bits: int, family: str) -> None:
    """Copy config.json, saying how the weights written next to it are quantized (THUDM's keys)."""
    with open(src, encoding="utf-8") as fh:
        raw = json.load(fh)
    if bits or raw.get("quantization_bit"):
        raw["quantization_bit"] = bits
        if family == "chatglm":
            raw["quantization_embeddings"] = False
    with open(dst, "w", encoding="utf-8") as fh:
        json.dump(raw, fh, indent=2, ensure_ascii=False)
