"""The conversions: any supported checkpoint -> mindglm tensors -> MindSpore .ckpt or THUDM
safetensors. Each is planned from names and shapes first (so a wrong config, a missing tensor or
a corrupt file fails before anything is written), then streamed one tensor at a time.
"""
from __future__ import annotations

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

DEFAULT_SHARD_BYTES = 2 * 1024 ** 3

def convert(src: str, dst: str, dtype: Optional[str] = None, config: ConfigArg = None,
            progress: Progress = None) -> dict:
    """Convert a checkpoint (see `iter_mindglm_tensors`) into a mindglm MindSpore .ckpt at `dst`.

    dtype: None keeps each tensor's source dtype (bfloat16 stays bfloat16); "float32", "float16"
    or "bfloat16" casts every float tensor. Written to `dst + '.tmp'` and renamed at the end, so
    no partial file is ever left behind. Returns {"tensors", "bytes", "seconds"}.
    """
    dtype = parse_dtype(dtype)
    if not dst.endswith(".ckpt"):
        raise CheckpointError(f"--dst {dst} should be a file name ending in .ckpt")
    if os.path.isdir(dst):
        raise CheckpointError(f"--dst {dst} is a directory; give a file name such as {dst}/model.ckpt")
    start = time.perf_counter()
    conversion = _Conversion(src, config, need_config=True)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    total = len(conversion.plan.targets)
    with CkptWriter(dst) as writer:
        for i, (name, array) in enumerate(conversion.stream(dtype, reuse=True)):
            writer.write(name, array)
            if progress:
                progress(i + 1, total, name, array)
            del array
    return {"tensors": writer.tensors, "bytes": writer.bytes, "seconds": time.perf_counter() - start}


def convert_to_hf(src: str, dst_dir: str, config: ConfigArg = None, dtype: Optional[str] = None,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: Progress = None) -> dict:
    """Write a checkpoint (normally a mindglm .ckpt) as THUDM-named safetensors shards in `dst_dir`.

    Produces model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json,
    plus a copy of the config.json used (`config` as a path, or the one next to `src`; without
    one it refuses, since a THUDM directory cannot load without it) and of the tokenizer files
    found next to `src` or the config (so the directory is complete for transformers and mindglm).
    ChatGLM-6B needs the config (its qkv layout); for ChatGLM2/3 it is optional and, when given,
    checks every shape. v1's tied lm_head.weight is not written (THUDM's model ties it on load).
    Files go to `dst_dir + '.tmp'` and move into `dst_dir` only when all of them are complete.
    """
    dtype = parse_dtype(dtype)
    start = time.perf_counter()
    conversion = _Conversion(src, config, need_config=False)
    plan, cfg = conversion.plan, conversion.config
    if cfg is None and plan.family == "chatglm":
        raise CheckpointError("a ChatGLM-6B checkpoint needs --config (its config.json) to write THUDM's "
                              "per-head qkv layout")
    if conversion.config_path is None:
        raise CheckpointError(f"no config.json next to {src}: a THUDM model directory needs one to load; pass "
                              "--config with the model's THUDM config.json (or its directory)")
    first = {t.name: conversion.tensors[t.pieces[0].source] for t in plan.targets}
    specs = [(thudm_name(t.name, plan.family), t.shape,
              dtype if dtype and first[t.name].dtype.is_float else first[t.name].dtype.name)
             for t in plan.targets]
    shards = split_shards(specs, max_shard_bytes)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    out_bytes = sum(int(np.prod(shape, dtype=np.int64)) * DTYPES[dt].itemsize for _, shape, dt in specs)

    def thudm_arrays():
        for i, (name, array) in enumerate(conversion.stream(dtype, reuse=True)):
            (thudm, out), = to_thudm(name, array, cfg, plan.family)
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
        shutil.copyfile(conversion.config_path, os.path.join(tmp_dir, "config.json"))
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
