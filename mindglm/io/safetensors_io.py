"""`.safetensors` read and written directly (all dtypes, bfloat16 included, one tensor at a time).

Format: 8-byte little-endian header length N, N bytes of JSON {name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}, then the data; offsets count from the end
of the header. The `safetensors` package refuses bfloat16 with numpy, so both directions are
implemented here (the tests check them against the package where it can read).
"""
from __future__ import annotations

import functools
import json
import os
import struct
from typing import Iterable, Iterator

import numpy as np

from mindglm.io.tensors import BY_SAFETENSORS, DTYPES, LazyTensor, corrupt, dtype_of, read_into
from mindglm.checkpoint import CheckpointError

_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors(path: str) -> list:
    """The tensors of a .safetensors file as LazyTensors, in data order (no data read yet)."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise corrupt(path, "no header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(_MAX_HEADER, size - 8):
            raise corrupt(path, f"header length {header_len} exceeds the file")
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise corrupt(path, f"bad header: {exc}") from None
    if not isinstance(header, dict):
        raise corrupt(path, "bad header")
    data_start, data_size = 8 + header_len, size - 8 - header_len
    tensors = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = BY_SAFETENSORS[info["dtype"]]
            shape = tuple(int(n) for n in info["shape"])
            begin, end = (int(n) for n in info["data_offsets"])
        except KeyError as exc:
            raise CheckpointError(f"{path}: tensor '{name}' has unsupported or missing {exc}") from None
        except (TypeError, ValueError):
            raise corrupt(path, f"bad header entry for '{name}'") from None
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or begin < 0:
            raise corrupt(path, f"'{name}' has {end - begin} bytes for shape {shape}")
        if end > data_size:
            raise corrupt(path, f"'{name}' ends at byte {data_start + end} of a {size}-byte file")
        fill = functools.partial(read_into, path, [(data_start + begin, end - begin)])
        tensors.append(LazyTensor(name, shape, dtype, path, fill, offset=data_start + begin))
    return sorted(tensors, key=lambda t: header[t.name]["data_offsets"][0])


def write_safetensors(path: str, specs: list, arrays: Iterator, metadata: "dict | None" = None) -> None:
    """Write the tensors planned in `specs` [(name, shape, dtype_name)] to `path`, streaming.

    The header is written first from the specs, then one array per spec is taken from the
    iterator `arrays` (so each is produced only when it is written); arrays must match their spec.
    """
    header, offset = {}, 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        header[name] = {"dtype": DTYPES[dtype].safetensors, "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape, dtype in specs:
            array = np.ascontiguousarray(next(arrays))
            if tuple(array.shape) != tuple(shape) or dtype_of(array).name != dtype:
                raise CheckpointError(f"internal error: '{name}' is {dtype_of(array).name}{array.shape}, "
                                      f"planned {dtype}{tuple(shape)}")
            fh.write(memoryview(array.reshape(-1)).cast("B"))


def split_shards(specs: Iterable, max_shard_bytes: int) -> list:
    """Split [(name, shape, dtype_name)] into consecutive shards of at most `max_shard_bytes`
    (a tensor larger than that gets a shard of its own)."""
    shards, current, size = [], [], 0
    for spec in specs:
        nbytes = int(np.prod(spec[1], dtype=np.int64)) * DTYPES[spec[2]].itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += nbytes
    if current:
        shards.append(current)
    return shards
