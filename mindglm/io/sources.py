"""Finding the weight files of a checkpoint (a THUDM directory or a single file) and listing
their tensors lazily, with the errors a user can act on (missing shard, corrupt file, no weights).
"""
from __future__ import annotations

import glob
import json
import os

from mindglm.io.ms_ckpt import read_ckpt_entries
from mindglm.io.safetensors_io import read_safetensors
from mindglm.io.tensors import corrupt
from mindglm.io.torch_bin import read_torch_bin
from mindglm.checkpoint import CheckpointError

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt")


def _reader(path: str):
    if path.endswith(".safetensors"):
        return read_safetensors
    if path.endswith(".ckpt"):
        return read_ckpt_entries
    return read_torch_bin


def _read_index(index_path: str) -> dict:
    try:
        with open(index_path, encoding="utf-8") as fh:
            weight_map = json.load(fh)["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise corrupt(index_path, f"not a weight index: {exc!r}") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise corrupt(index_path, "empty weight_map")
    return weight_map


def find_weight_files(src: str) -> tuple:
    """(files, weight_map or None) for a checkpoint directory or file.

    A directory is looked up the way Hugging Face does: a safetensors index, a .bin index, a
    single model.safetensors / pytorch_model.bin, else the *.safetensors, *.bin or *.ckpt files.
    Every shard an index names must exist.
    """
    if os.path.isfile(src):
        if not src.endswith(WEIGHT_SUFFIXES):
            raise CheckpointError(f"{src} is not a checkpoint file (expected {', '.join(WEIGHT_SUFFIXES)})")
        return [src], None
    if not os.path.isdir(src):
        raise CheckpointError(f"no checkpoint at {src}: give a model directory or a weight file")
    for index in INDEX_FILES:
        index_path = os.path.join(src, index)
        if os.path.isfile(index_path):
            weight_map = _read_index(index_path)
            files = list(dict.fromkeys(weight_map.values()))
            for shard in files:
                if not os.path.isfile(os.path.join(src, shard)):
                    tensor = next(n for n, f in weight_map.items() if f == shard)
                    raise CheckpointError(f"shard {shard} named in {index_path} (it holds '{tensor}' and "
                                          f"others) is missing from {src}: download it")
            return [os.path.join(src, f) for f in files], weight_map
    for single in SINGLE_FILES:
        if os.path.isfile(os.path.join(src, single)):
            return [os.path.join(src, single)], None
    for suffix in WEIGHT_SUFFIXES:
        files = sorted(glob.glob(os.path.join(glob.escape(src), "*" + suffix)))
        if files:
            return files, None
    raise CheckpointError(f"no weights found in {src}: expected {' or '.join(INDEX_FILES)}, "
                          f"{' or '.join(SINGLE_FILES)}, or *.safetensors / *.bin / *.ckpt files")


def list_tensors(src: str) -> list:
    """All tensors of a checkpoint directory or file as LazyTensors, in file order.

    Reads only headers (pickles, safetensors headers, protobuf records), so a truncated or corrupt
    file, or an index that lists a tensor its shard lacks, fails here before anything is written.
    """
    files, weight_map = find_weight_files(src)
    tensors, seen = [], {}
    for path in files:
        for tensor in _reader(path)(path):
            if tensor.name in seen:
                raise CheckpointError(f"tensor '{tensor.name}' appears in both {seen[tensor.name]} and {path}")
            seen[tensor.name] = path
            tensors.append(tensor)
    if weight_map is not None:
        for name, shard in weight_map.items():
            if name not in seen:
                raise CheckpointError(f"the index lists '{name}' in {shard} but that shard does not hold it: "
                                      "re-download the shard")
    return tensors
