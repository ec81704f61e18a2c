"""THUDM's weight-only int8 / int4 format, in numpy (no MindSpore: the converter uses it too).

THUDM's `quantization.py` (chatglm-6b-int4/-int8, chatglm2-6b-int4) quantizes the four matrices
of every layer (query_key_value, dense, dense_h_to_4h, dense_4h_to_h) per output row:

    scale[n] = absmax(w[n, :]) / 127 (int8) or / 7 (int4), computed in fp16 and kept in fp16
    q[n, k]  = round(w[n, k] / scale[n])                      (fp16 division, round half to even)

and int4 packs two values per byte along the input axis: column 2j in the high nibble, 2j+1 in
the low one ([out, in/2] int8). The weights are quantized from their fp16 values, whatever the
checkpoint stores (chatglm2-6b's bf16 is cast to fp16 first, as THUDM's `.half()` does).
numpy's float16 arithmetic rounds each operation to fp16 like torch's, so this reproduces
THUDM's bytes exactly (tests check it against the fixtures' int8/ and int4/ dirs).
"""
from __future__ import annotations

import numpy as np

from mindglm.checkpoint import CheckpointError, packed_columns

BITS = (4, 8)
FORMATS = {"int8": 8, "int4": 4}


def check_bits(bits, source: str = "quantization_bit") -> int:
    """0 (not quantized), 4 or 8; anything else is a clear error."""
    if bits in (0, None):
        return 0
    if isinstance(bits, bool) or bits not in BITS:
        raise CheckpointError(f"{source} is {bits!r}: THUDM's weight-only quantization has 4 or 8 bits "
                              "(0 for none)")
    return int(bits)


# Rows quantized at a time: the fp16 copy and the float temporaries of a block stay ~16 MB. Whole
# matrices made several temporaries of the matrix's size at once (the 6B output layer, 0.53 GB in
# fp16, raised the load's peak RSS by 1.5 GB).
QUANTIZE_BLOCK_BYTES = 16 << 20


def quantize_rows(weight: np.ndarray, bits: int) -> tuple:
    """(q int8 [out, in] or packed [out, in/2], scale float16 [out]) from a float [out, in] matrix."""
    bits = check_bits(bits)
    if weight.ndim != 2:
        raise CheckpointError(f"only matrices are quantized, got shape {weight.shape}")
    rows, columns = weight.shape
    q = np.empty((rows, packed_columns(columns, bits)), np.int8)
    scale = np.empty(rows, np.float16)
    step = max(1, QUANTIZE_BLOCK_BYTES // (2 * max(columns, 1)))
    for start in range(0, rows, step):   # each row is quantized on its own: blocks change no value
        block = slice(start, start + step)
        q[block], scale[block] = _quantize_block(weight[block], bits)
    return q, scale


def _quantize_block(weight: np.ndarray, bits: int) -> tuple:
    w16 = np.asarray(weight).astype(np.float16)
    limit = np.float16(2 ** (bits - 1) - 1)
    scale = (np.abs(w16).max(axis=1) / limit).astype(np.float16)
    # An all-zero row has scale 0 (THUDM divides 0 by 0 there); its weights are simply 0.
    safe = np.where(scale == 0, np.float16(1), scale)
    with np.errstate(over="ignore"):
        q = np.round(w16 / safe[:, None])
    q = np.clip(q, -limit - 1, limit).astype(np.int8)
    return (pack_int4(q) if bits == 4 else q), scale


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7], [out, in] -> THUDM's packed [out, in/2] (column 2j in the high nibble)."""
    q = np.asarray(q, np.int8)
    high, low = q[:, 0::2].astype(np.uint8), q[:, 1::2].astype(np.uint8)
    return ((high << 4) | (low & 0x0F)).astype(np.uint8).view(np.int8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """THUDM's packed [out, in/2] -> int8 values [out, in]."""
    packed = np.asarray(packed, np.int8)
    high = packed >> 4                                   # arithmetic shift keeps the sign
    low = (packed.astype(np.uint8) << 4).view(np.int8) >> 4
    out = np.empty((packed.shape[0], packed.shape[1] * 2), np.int8)
    out[:, 0::2], out[:, 1::2] = high, low
    return out


def dequantize(weight: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """float32 [out, in] = q * scale, the quantized layer's exact function."""
    q = unpack_int4(weight) if check_bits(bits) == 4 else np.asarray(weight, np.int8)
    return q.astype(np.float32) * np.asarray(scale, np.float32)[:, None]


def pack_int4_along_n(q: np.ndarray) -> np.ndarray:
    """int8 values [out, in] -> Ascend WeightQuantBatchMatmul's int4 layout [in, out/2]: the
    weight transposed to [K, N] and packed along N, low nibble first (element 2j in the low
    nibble) — the opposite axis and nibble order of THUDM's."""
    kn = np.ascontiguousarray(np.asarray(q, np.int8).T)
    if kn.shape[1] % 2:
        raise CheckpointError(f"Ascend's int4 layout packs along the output axis, which is odd ({kn.shape[1]})")
    low, high = kn[:, 0::2].astype(np.uint8), kn[:, 1::2].astype(np.uint8)
    return ((high << 4) | (low & 0x0F)).astype(np.uint8).view(np.int8)


def bfloat16_bits(weight: np.ndarray) -> np.ndarray:
    """float32 `weight` rounded to the nearest bfloat16 (ties to even), as uint16 bits (its top 16
    bits after rounding). Infinities and NaNs are cut, not rounded, so they stay non-finite."""
    bits = np.ascontiguousarray(weight, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = np.where(np.isfinite(weight), rounded, bits >> 16)
    return rounded.astype(np.uint16)
