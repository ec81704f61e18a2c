"""Tensor records shared by the readers and writers: dtypes, lazy tensors and casts.

numpy has no bfloat16. Inside the readers a bfloat16 tensor is a uint16 array holding the raw
bits, so it passes through renames and row permutations untouched and is written back bit for
bit; `to_numpy` widens it to float32 (exactly: bits << 16) for callers outside the package.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from mindglm.checkpoint import CheckpointError
from mindglm.config import DTYPES as MODEL_DTYPES


@dataclass(frozen=True)
class DType:
    """One element type and its spelling in each file format."""
    name: str
    numpy: np.dtype      # storage dtype of the in-memory array (uint16 for bfloat16)
    mindspore: str       # TensorProto.tensor_type in a MindSpore .ckpt
    safetensors: str     # "dtype" in a safetensors header
    torch: str           # legacy storage class pickled by torch.save

    @property
    def itemsize(self) -> int:
        return self.numpy.itemsize

    @property
    def is_float(self) -> bool:
        return self.name in FLOAT_DTYPES


_TABLE = [
    ("float32", np.float32, "Float32", "F32", "FloatStorage"),
    ("float16", np.float16, "Float16", "F16", "HalfStorage"),
    ("bfloat16", np.uint16, "BFloat16", "BF16", "BFloat16Storage"),
    ("float64", np.float64, "Float64", "F64", "DoubleStorage"),
    ("int64", np.int64, "Int64", "I64", "LongStorage"),
    ("int32", np.int32, "Int32", "I32", "IntStorage"),
    ("int16", np.int16, "Int16", "I16", "ShortStorage"),
    ("int8", np.int8, "Int8", "I8", "CharStorage"),
    ("uint8", np.uint8, "UInt8", "U8", "ByteStorage"),
    ("bool", np.bool_, "Bool", "BOOL", "BoolStorage"),
]
DTYPES = {row[0]: DType(row[0], np.dtype(row[1]), *row[2:]) for row in _TABLE}
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
BY_MINDSPORE = {d.mindspore: d for d in DTYPES.values()}
BY_SAFETENSORS = {d.safetensors: d for d in DTYPES.values()}
BY_TORCH = {d.torch: d for d in DTYPES.values()}
BY_NUMPY = {d.numpy: d for d in DTYPES.values()}
ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}
CAST_TARGETS = MODEL_DTYPES  # a conversion casts to the dtypes a model can hold


def corrupt(path: str, why: str, fix: str = "re-download it") -> CheckpointError:
    """The error for a damaged file: names the file, what is wrong and what to do."""
    return CheckpointError(f"{path} is truncated or corrupt ({why}); {fix}")


def dtype_of(array: np.ndarray) -> DType:
    """The DType of an in-memory array (uint16 means bfloat16 bits)."""
    try:
        return BY_NUMPY[array.dtype.newbyteorder("=")]
    except KeyError:
        raise CheckpointError(f"unsupported array dtype {array.dtype}") from None


def parse_dtype(name) -> "str | None":
    """Normalise a user's --dtype ('bf16', 'float16', None...) to a CAST_TARGETS name or None."""
    if name is None:
        return None
    value = ALIASES.get(str(name).lower(), str(name).lower())
    if value not in CAST_TARGETS:
        raise CheckpointError(f"--dtype {name!r} is not supported; choose one of {', '.join(CAST_TARGETS)}")
    return value


@dataclass
class LazyTensor:
    """A tensor known by name, shape and dtype; `load()` reads its data (one tensor in memory).

    `fill(out)` writes the tensor's data into `out`, a C-contiguous array of its shape and dtype.
    `offset`: where the data starts in the file `origin` when the file holds it as one C-ordered,
    little-endian run of bytes (safetensors always, a .ckpt tensor saved in one record, a .bin
    tensor in a stored zip member as torch.save writes them); then
    `mapped()` can stand in for `load()`.
    """
    name: str
    shape: tuple
    dtype: DType
    origin: str
    fill: Callable[[np.ndarray], None]
    offset: Optional[int] = None

    def mapped(self) -> np.ndarray:
        """The tensor as a read-only memory map of its file (its data read only where it is used:
        a tensor-parallel rank slicing it reads just its rows or columns), or its `load()` when
        the file does not hold it as one run."""
        if self.offset is None or not self.nbytes:
            return self.load()
        return np.memmap(self.origin, self.dtype.numpy, "r", self.offset, self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def load(self, pool: "BufferPool | None" = None) -> np.ndarray:
        """The tensor's data, in a fresh array or (with `pool`) in the pool's reusable buffer."""
        out = pool.array(self.shape, self.dtype.numpy) if pool else np.empty(self.shape, self.dtype.numpy)
        self.fill(out)
        return out


def read_into(path: str, ranges, out: np.ndarray, fix: str = "re-download it") -> None:
    """Fill `out` with the bytes of `ranges` [(offset, length)] of file `path`, in order."""
    view = memoryview(out.reshape(-1)).cast("B")
    done = 0
    with open(path, "rb") as fh:
        for offset, length in ranges:
            fh.seek(offset)
            if fh.readinto(view[done:done + length]) != length:
                raise corrupt(path, "file ends early", fix)
            done += length
    if done != len(view):
        raise corrupt(path, f"{done} bytes for a {len(view)}-byte tensor", fix)


class BufferPool:
    """Reusable output buffers for a streaming loop: `array()` hands out a view of one buffer,
    valid until the next call. Fresh large allocations cost a page fault per 4 KiB page on first
    touch, which made conversion ~20x slower than copying into memory that is already mapped.
    """

    def __init__(self, nbytes: int = 0):
        self._buffer = np.empty(nbytes, np.uint8)

    def array(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if self._buffer.nbytes < nbytes:
            self._buffer = np.empty(nbytes, np.uint8)
        return self._buffer[:nbytes].view(dtype).reshape(shape)


# ---------------------------------------------------------------------------------- casts

_BLOCK = 1 << 22  # elements per cast block: keeps temporaries small next to a 1 GB tensor


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16, nearest-even; NaNs stay (quiet) NaNs."""
    bits = values.view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | np.uint32(0x40)).astype(np.uint16)
    return rounded


def _cast_block(block: np.ndarray, src: str, dst: str) -> np.ndarray:
    as_f32 = _bf16_bits_to_f32(block) if src == "bfloat16" else block.astype(np.float32, copy=False)
    if dst == "bfloat16":
        return _f32_to_bf16_bits(np.ascontiguousarray(as_f32))
    return as_f32.astype(DTYPES[dst].numpy, copy=False)


def cast(array: np.ndarray, dst: "str | None", pool: "BufferPool | None" = None) -> np.ndarray:
    """Cast an in-memory array to dtype `dst` (None: unchanged), block by block, into a fresh
    array or the pool's buffer. Non-float tensors are never cast; float32 -> bfloat16 rounds to
    nearest even."""
    src = dtype_of(array).name
    if dst is None or src == dst or src not in FLOAT_DTYPES:
        return array
    flat = np.ascontiguousarray(array).reshape(-1)
    out = pool.array(flat.shape, DTYPES[dst].numpy) if pool else np.empty(flat.shape, DTYPES[dst].numpy)
    for start in range(0, flat.size, _BLOCK):
        out[start:start + _BLOCK] = _cast_block(flat[start:start + _BLOCK], src, dst)
    return out.reshape(array.shape)


def to_numpy(array: np.ndarray, pool: "BufferPool | None" = None) -> np.ndarray:
    """A plain numpy array for callers outside the readers: bfloat16 bits become float32."""
    return cast(array, "float32", pool) if dtype_of(array).name == "bfloat16" else array
