"""MindSpore `.ckpt` files written and read tensor by tensor, without MindSpore.

A `.ckpt` is a protobuf `Checkpoint { repeated Value value = 1; }` with `Value { required string
tag = 1; oneof { TensorProto tensor = 2; MapTensorProto maptensor = 3; } }` and `TensorProto {
repeated int64 dims = 1; required string tensor_type = 2; required bytes tensor_content = 3; }`
(mindspore/train/checkpoint_pb2.py in MindSpore 2.10). A repeated field may be spread over many
concatenated messages, so `mindspore.save_checkpoint` writes one `Checkpoint` per Value and splits
tensors over 512 MiB into consecutive Values with the same tag and full dims; `load_checkpoint`
joins consecutive same-tag contents. `tensor_type` is str(mindspore dtype): "Float32",
"Float16", "BFloat16", ... An optional trailer b"crc_num" + 10 bytes may end the file.
"""
from __future__ import annotations

import functools
import os
from typing import Iterator

import numpy as np

from mindglm.io.tensors import BY_MINDSPORE, LazyTensor, corrupt, dtype_of, read_into, to_numpy
from mindglm.checkpoint import CheckpointError

CHUNK_BYTES = 512 * 1024 * 1024  # what mindspore.save_checkpoint uses (SLICE_SIZE KiB)
_CRC_TRAILER = b"crc_num"
_CRC_TRAILER_LEN = len(_CRC_TRAILER) + 10
_FIX = "re-download or re-convert it"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _len_field(field: int, payload_len: int) -> bytes:
    return _key(field, 2) + _varint(payload_len)


class CkptWriter:
    """Streams tensors into a MindSpore .ckpt: written to `path + '.tmp'`, renamed on `close()`.

    Use as a context manager; on an exception the temporary file is removed, so a failed
    conversion never leaves a partial checkpoint (nor replaces an existing one).
    """

    def __init__(self, path: str, chunk_bytes: int = CHUNK_BYTES):
        self.path, self.tmp_path, self.chunk_bytes = path, path + ".tmp", chunk_bytes
        self.tensors = self.bytes = 0
        self._fh = open(self.tmp_path, "wb")

    def write(self, name: str, array: np.ndarray) -> None:
        """Append tensor `name` (bfloat16 as uint16 bits)."""
        array = np.ascontiguousarray(array)
        dtype = dtype_of(array)
        content = memoryview(array.reshape(-1)).cast("B")
        tag = name.encode()
        dims = b"".join(_key(1, 0) + _varint(int(n)) for n in array.shape)
        type_field = _len_field(2, len(dtype.mindspore)) + dtype.mindspore.encode()
        for start in range(0, max(len(content), 1), self.chunk_bytes):
            chunk = content[start:start + self.chunk_bytes]
            tensor_head = dims + type_field + _len_field(3, len(chunk))
            tensor_len = len(tensor_head) + len(chunk)
            value_head = _len_field(1, len(tag)) + tag + _len_field(2, tensor_len)
            self._fh.write(_len_field(1, len(value_head) + tensor_len) + value_head + tensor_head)
            self._fh.write(chunk)
        self.tensors += 1
        self.bytes += len(content)

    def close(self) -> None:
        """Finish the file and move it into place."""
        self._fh.close()
        os.replace(self.tmp_path, self.path)

    def abort(self) -> None:
        """Drop the temporary file."""
        self._fh.close()
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


class _Cursor:
    """Reads protobuf wire format from a file, bounds-checked against a limit."""

    def __init__(self, fh, path: str, size: int):
        self.fh, self.path, self.pos, self.size = fh, path, 0, size

    def _need(self, n: int, limit: int):
        if self.pos + n > limit:
            raise corrupt(self.path, f"a record at byte {self.pos} runs past its end", _FIX)

    def read(self, n: int, limit: int) -> bytes:
        self._need(n, limit)
        self.fh.seek(self.pos)
        data = self.fh.read(n)
        self.pos += n
        return data

    def varint(self, limit: int) -> int:
        shift = result = 0
        while True:
            byte = self.read(1, limit)[0]
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise corrupt(self.path, "bad varint", _FIX)

    def skip(self, wire_type: int, limit: int):
        if wire_type == 0:
            self.varint(limit)
        elif wire_type == 2:
            n = self.varint(limit)
            self._need(n, limit)
            self.pos += n
        elif wire_type in (1, 5):
            self._need(8 if wire_type == 1 else 4, limit)
            self.pos += 8 if wire_type == 1 else 4
        else:
            raise corrupt(self.path, f"unexpected wire type {wire_type}: not a MindSpore checkpoint "
                          "(or an encrypted one)", _FIX)


def _parse_tensor(cur: _Cursor, end: int):
    dims, tensor_type, content = [], None, None
    while cur.pos < end:
        key = cur.varint(end)
        field, wire_type = key >> 3, key & 7
        if field == 1 and wire_type == 0:
            dims.append(cur.varint(end))
        elif field == 1 and wire_type == 2:  # packed dims
            stop = cur.varint(end) + cur.pos
            while cur.pos < stop:
                dims.append(cur.varint(stop))
        elif field == 2 and wire_type == 2:
            tensor_type = cur.read(cur.varint(end), end).decode(errors="replace")
        elif field == 3 and wire_type == 2:
            n = cur.varint(end)
            cur._need(n, end)
            content = (cur.pos, n)
            cur.pos += n
        else:
            cur.skip(wire_type, end)
    return dims, tensor_type, content


def _parse_values(path: str) -> Iterator:
    """Yield (tag, dims, tensor_type, (offset, length)) for each Value, reading only headers."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        cur = _Cursor(fh, path, size)
        while cur.pos < size:
            if size - cur.pos == _CRC_TRAILER_LEN:
                fh.seek(cur.pos)
                if fh.read(len(_CRC_TRAILER)) == _CRC_TRAILER:
                    return
            key = cur.varint(size)
            if key != (1 << 3 | 2):
                cur.skip(key & 7, size)
                continue
            end = cur.varint(size) + cur.pos
            cur._need(end - cur.pos, size)
            tag = tensor = None
            while cur.pos < end:
                vkey = cur.varint(end)
                if vkey == (1 << 3 | 2):
                    tag = cur.read(cur.varint(end), end).decode(errors="replace")
                elif vkey == (2 << 3 | 2):
                    tensor_end = cur.varint(end) + cur.pos
                    cur._need(tensor_end - cur.pos, end)
                    tensor = _parse_tensor(cur, tensor_end)
                elif vkey == (3 << 3 | 2):
                    raise CheckpointError(f"{path}: '{tag}' is a MapParameter, which mindglm does not read")
                else:
                    cur.skip(vkey & 7, end)
            if tag is None or tensor is None or tensor[1] is None or tensor[2] is None:
                raise corrupt(path, f"incomplete record before byte {end}", _FIX)
            yield (tag,) + tensor


def read_ckpt_entries(path: str) -> list:
    """The tensors of a MindSpore .ckpt as LazyTensors, in file order (only headers are read;
    string entries, which MindSpore's append_dict can add, are skipped)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint file at {path}")
    tensors, last = [], None
    for tag, dims, tensor_type, chunk in _parse_values(path):
        if tensor_type == "str":  # string metadata saved through append_dict, not a weight
            continue
        dtype = BY_MINDSPORE.get(tensor_type)
        if dtype is None:
            raise CheckpointError(f"{path}: tensor '{tag}' has unsupported type {tensor_type!r}")
        if last is not None and last["name"] == tag:
            last["chunks"].append(chunk)
            continue
        shape = () if dims == [0] else tuple(dims)
        last = {"name": tag, "shape": shape, "dtype": dtype, "chunks": [chunk]}
        tensors.append(last)
    out = []
    for t in tensors:
        fill = functools.partial(read_into, path, t["chunks"], fix=_FIX)
        lazy = LazyTensor(t["name"], t["shape"], t["dtype"], path, fill,
                          offset=t["chunks"][0][0] if len(t["chunks"]) == 1 else None)
        if sum(n for _, n in t["chunks"]) != lazy.nbytes:
            raise corrupt(path, f"'{t['name']}' holds {sum(n for _, n in t['chunks'])} bytes for "
                          f"{t['dtype'].name}{t['shape']}", _FIX)
        out.append(lazy)
    return out


def read_ckpt(path: str, raw: bool = False) -> Iterator:
    """Yield (name, array) for each tensor of a MindSpore .ckpt, one tensor in memory at a time.

    bfloat16 tensors come out as float32 (exact), or as their uint16 bits with raw=True.
    """
    for tensor in read_ckpt_entries(path):
        array = tensor.load()
        yield tensor.name, array if raw else to_numpy(array)
