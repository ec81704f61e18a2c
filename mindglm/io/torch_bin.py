"""PyTorch `.bin` checkpoints (torch.save's zip format) read and written without torch.

A `.bin` is an uncompressed zip: `<prefix>/data.pkl` pickles the state dict, each tensor being
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` whose storage is a pickle
*persistent id* ('storage', <torch.XStorage>, key, location, numel) pointing at the zip member
`<prefix>/data/<key>`. The pickle is read by a restricted unpickler that resolves only those few
globals (anything else is refused, so no pickled code ever runs) and returns lazy tensors: each
storage is read from the zip only when its tensor is loaded.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from mindglm.io.tensors import BY_TORCH, DType, LazyTensor, corrupt, dtype_of, read_into
from mindglm.checkpoint import CheckpointError

_ZIP_MAGIC = b"PK\x03\x04"
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length


@dataclass(frozen=True)
class _StorageRef:
    dtype: DType
    key: str
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: tuple
    stride: tuple


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError("tensor without a storage")
    return _TensorRef(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, *unused):
    return data


class _StorageType:
    """Stands for a pickled `torch.XStorage` class: only its dtype matters."""

    def __init__(self, dtype: DType):
        self.dtype = dtype


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only torch's tensor-rebuild functions, storage types and OrderedDict."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in BY_TORCH:
            return _StorageType(BY_TORCH[name])
        raise pickle.UnpicklingError(f"refusing to load '{module}.{name}': only plain tensor state dicts "
                                     "are read (no pickled code is ever run)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported storage reference {pid!r}")
        return _StorageRef(pid[1].dtype, str(pid[2]), int(pid[4]))


def _find_pickle(zf: zipfile.ZipFile, path: str) -> str:
    pickles = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise corrupt(path, f"expected one data.pkl in the archive, found {len(pickles)}")
    return pickles[0][: -len("data.pkl")]


def read_torch_bin(path: str) -> list:
    """The tensors of a torch.save zip file as LazyTensors, in pickle order (no data read yet)."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != _ZIP_MAGIC:
        if magic[:1] == b"\x80":
            raise CheckpointError(f"{path} uses PyTorch's legacy (pre-1.6) format, which mindglm does not "
                                  "read: re-save it with torch.save(state_dict, path) (the zip format)")
        raise corrupt(path, "not a zip archive")
    try:
        with zipfile.ZipFile(path) as zf:
            prefix = _find_pickle(zf, path)
            members = set(zf.namelist())
            byteorder = zf.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in members \
                else "little"
            state = _RestrictedUnpickler(io.BytesIO(zf.read(prefix + "data.pkl"))).load()
            infos = {n[len(prefix) + len("data/"):]: zf.getinfo(n) for n in members if n.startswith(prefix + "data/")}
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (zipfile.BadZipFile, EOFError, zlib.error, struct.error, UnicodeDecodeError) as exc:
        raise corrupt(path, str(exc)) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(state).__name__})")
    starts = _data_starts(path, infos.values())
    tensors = []
    for name, ref in state.items():
        if not isinstance(ref, _TensorRef):
            raise CheckpointError(f"{path}: entry '{name}' is a {type(ref).__name__}, not a tensor; "
                                  "save the model's state_dict() only")
        info = infos.get(ref.storage.key)
        if info is None:
            raise corrupt(path, f"storage data/{ref.storage.key} of '{name}' is missing")
        start = starts.get(info.filename)
        tensors.append(LazyTensor(name, ref.shape, ref.storage.dtype, path,
                                  _Loader(path, info, ref, byteorder != "little", start),
                                  offset=_mappable_offset(info, ref, byteorder, start)))
    return tensors


def _data_starts(path: str, infos) -> dict:
    """{member name: file offset of its data} for the stored (uncompressed) members, read from
    their local headers in one pass over the file."""
    starts = {}
    with open(path, "rb") as fh:
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED:
                continue
            fh.seek(info.header_offset)
            header = fh.read(_LOCAL_HEADER.size)
            if len(header) != _LOCAL_HEADER.size or _LOCAL_HEADER.unpack(header)[0] != _ZIP_MAGIC:
                raise corrupt(path, f"bad zip entry {info.filename}")
            _, name_len, extra_len = _LOCAL_HEADER.unpack(header)
            starts[info.filename] = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    return starts


def _mappable_offset(info: zipfile.ZipInfo, ref: "_TensorRef", byteorder: str, data_start):
    """Where a tensor's bytes start in the file when they lie there as one C-ordered little-endian
    run (a stored zip member, as torch.save writes): a tensor-parallel rank then maps it and reads
    only its slice. None otherwise (the loader reads it whole)."""
    itemsize = ref.storage.dtype.itemsize
    numel = int(np.prod(ref.shape, dtype=np.int64))
    if (data_start is None or byteorder != "little" or not _is_contiguous(ref.shape, ref.stride)
            or ref.offset + numel > ref.storage.numel or ref.storage.numel * itemsize > info.file_size):
        return None
    return data_start + ref.offset * itemsize


class _Loader:
    """Fills an array with one tensor's bytes, read straight from the zip member (stored, so no
    decompression); a member read whole is checked against its CRC-32."""

    def __init__(self, path: str, info: zipfile.ZipInfo, ref: _TensorRef, swap: bool, data_start):
        self.path, self.info, self.ref, self.swap = path, info, ref, swap
        self.data_start = data_start    # of a stored member (None: compressed)

    def __call__(self, out: np.ndarray) -> None:
        ref, dtype = self.ref, self.ref.storage.dtype
        if out.size == 0:
            return
        if any(s < 0 for s in ref.stride):
            raise CheckpointError(f"{self.path}: tensor with negative strides is not supported")
        span = 1 + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
        if ref.offset + span > ref.storage.numel or ref.storage.numel * dtype.itemsize > self.info.file_size:
            raise corrupt(self.path, f"storage data/{ref.storage.key} is shorter than its tensors")
        contiguous = _is_contiguous(ref.shape, ref.stride)
        flat = out.reshape(-1) if contiguous else np.empty(span, dtype.numpy)
        self._read(ref.offset * dtype.itemsize, flat)
        if self.swap:
            flat.byteswap(inplace=True)
        if not contiguous:
            out[...] = np.lib.stride_tricks.as_strided(flat, ref.shape, [s * dtype.itemsize for s in ref.stride])

    def _read(self, start: int, flat: np.ndarray) -> None:
        info, nbytes = self.info, flat.nbytes
        if self.data_start is None:
            with zipfile.ZipFile(self.path) as zf:
                flat.view(np.uint8)[:] = np.frombuffer(zf.read(info), np.uint8, nbytes, start)
            return
        read_into(self.path, [(self.data_start + start, nbytes)], flat)
        if start == 0 and nbytes == info.file_size and zlib.crc32(flat.view(np.uint8)) != info.CRC:
            raise corrupt(self.path, f"checksum mismatch in {info.filename}")


def _is_contiguous(shape, stride) -> bool:
    expected = 1
    for n, s in zip(reversed(shape), reversed(stride)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


# ---------------------------------------------------------------------------------- writing

def save_torch_bin(path: str, tensors: Iterable, prefix: str = "archive") -> None:
    """Write (name, array) pairs as a torch.save zip that torch.load reads (bfloat16 = uint16 bits).

    Tensors are streamed: each array is written as it comes, then the pickle last. Used by the
    tests and the benchmark to build THUDM-style checkpoints without torch.
    """
    entries = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.writestr(f"{prefix}/byteorder", "little")
        for key, (name, array) in enumerate(tensors):
            array = np.ascontiguousarray(array)
            with zf.open(f"{prefix}/data/{key}", "w", force_zip64=array.nbytes > (1 << 31)) as member:
                member.write(memoryview(array.reshape(-1)).cast("B"))
            entries.append((name, dtype_of(array), str(key), array.size, 0, array.shape,
                            _contiguous_strides(array.shape)))
        zf.writestr(f"{prefix}/data.pkl", state_dict_pickle(entries))
        zf.writestr(f"{prefix}/version", "3\n")


def state_dict_pickle(entries) -> bytes:
    """data.pkl for `entries` [(name, DType, storage key, storage numel, offset, shape, stride)]:
    pickle protocol 2 opcodes of an OrderedDict of `_rebuild_tensor_v2` calls, as torch writes."""
    out = io.BytesIO()
    w = out.write

    def text(s):
        data = s.encode()
        w(b"X" + struct.pack("<I", len(data)) + data)

    def integer(n):
        if n < 2 ** 31:
            w(b"J" + struct.pack("<i", n))  # BININT
        else:
            w(b"\x8a\x08" + struct.pack("<q", n))  # LONG1, 8 bytes

    def ints_tuple(values):
        w(b"(")
        for v in values:
            integer(int(v))
        w(b"t")

    ordered_dict = b"ccollections\nOrderedDict\n)R"
    w(b"\x80\x02" + ordered_dict + b"(")
    for name, dtype, key, numel, offset, shape, stride in entries:
        text(name)
        w(b"ctorch._utils\n_rebuild_tensor_v2\n(")
        w(b"(")
        text("storage")
        w(f"ctorch\n{dtype.torch}\n".encode())
        text(key)
        text("cpu")
        integer(int(numel))
        w(b"tQ")
        integer(int(offset))
        ints_tuple(shape)
        ints_tuple(stride)
        w(b"\x89" + ordered_dict + b"tR")
    w(b"u.")
    return out.getvalue()


def _contiguous_strides(shape) -> list:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return strides[::-1]
