"""Compile the C++ kernels of this folder on first use and cache the shared library.

The library is keyed by the source, the compiler's version and the CPU features it is built
for, and lives in the user's cache dir (`$MINDGLM_CACHE_DIR`, else `$XDG_CACHE_HOME/mindglm`,
else `~/.cache/mindglm`), so a second process (or a CPU upgrade) finds the right one.
Nothing is downloaded: g++ (or `$CXX`) is the only tool needed, found at run time.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache

from mindglm.config import ConfigError

KERNEL_DIR = os.path.dirname(os.path.abspath(__file__))
SOURCES = ("linear.cc", "fused.cc", "attention.cc", "block.cc")
HEADERS = ("layer.h", "pool.h", "simd.h")  # part of the cache key, not of the command line
# The SIMD path needs all three; without them the same source builds its scalar loops.
SIMD_FEATURES = ("avx2", "fma", "f16c")
PORTABLE_HINT = ("or build the model with the portable backend (dequantize + MatMul, slower): "
                 "model.model_config.linear_backend: portable in YAML, linear_backend=\"portable\" in "
                 "GLMConfig")


class KernelBuildError(ConfigError):
    """The CPU kernels cannot be built here; the message names the cause and the way out (a
    ConfigError, so the front ends print it as one line like any other setup mistake)."""


def cpuinfo_field(name: str) -> "str | None":
    """The first /proc/cpuinfo line `name : value`'s value, or None (no such line or file)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_features() -> frozenset:
    """The x86 feature flags of this CPU (empty where /proc/cpuinfo has none, e.g. on ARM)."""
    return frozenset((cpuinfo_field("flags") or "").split())


# $MINDGLM_KERNEL_ISA caps the instruction set the kernels are built for (the widest the CPU has,
# by default): to compare the paths, or for a library shared with an older CPU.
ISA_LEVELS = ("native", "avx2", "portable")


def compile_flags(features=None, isa: str = None) -> list:
    """-march=native with AVX2/FMA/F16C (the kernels' SIMD path; AVX-512 where the CPU has it),
    else a portable -O3 build; `isa` (default $MINDGLM_KERNEL_ISA or "native") caps the level."""
    features = cpu_features() if features is None else features
    isa = isa or os.environ.get("MINDGLM_KERNEL_ISA") or "native"
    if isa not in ISA_LEVELS:
        raise KernelBuildError(f"MINDGLM_KERNEL_ISA={isa!r} is not one of {', '.join(ISA_LEVELS)}: "
                               "unset it to build for this CPU")
    flags = ["-O3", "-std=c++20", "-shared", "-fPIC", "-pthread", "-fno-math-errno"]
    simd = isa != "portable" and all(f in features for f in SIMD_FEATURES)
    if simd:
        flags.append("-march=native")
        if isa == "avx2":
            flags.append("-mno-avx512f")   # and with it every AVX-512 extension
    avx512 = simd and isa == "native" and "avx512f" in features
    flags.append(f"-DMG_PREFETCH_WEIGHTS={int(prefetch_weights(avx512))}")
    return flags


def prefetch_weights(avx512: bool) -> bool:
    """Whether the weight loops prefetch ahead in software ($MINDGLM_KERNEL_PREFETCH=1 / 0, else
    on for AVX-512 builds only). Measured on 2 cores, the `small` decode step's 33 matrices: the
    two AVX-512 CPUs gained (a Xeon: every format, fp32 26.2 -> 24.0 ms, int8 15.7 -> 8.8; a Zen 4:
    the int4 loops), the one AVX2-only CPU lost (a Zen 1 EPYC: fp32 24.1 vs 25.4 ms, int8 14.4
    vs 15.1, int4 15.8 vs 17.8 without and with), where the hardware prefetcher keeps up alone.
    A CPU of another kind should be measured both ways (linear.cc names the loops)."""
    setting = os.environ.get("MINDGLM_KERNEL_PREFETCH")
    if setting not in (None, "", "0", "1"):
        raise KernelBuildError(f"MINDGLM_KERNEL_PREFETCH={setting!r} is not 0 or 1: unset it to let the "
                               "kernels choose for this CPU")
    return avx512 if setting in (None, "") else setting == "1"


def cache_dir() -> str:
    root = os.environ.get("MINDGLM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mindglm")
    return os.path.join(root, "kernels")


def find_compiler() -> str:
    compiler = os.environ.get("CXX", "g++")
    path = shutil.which(compiler)
    if path is None:
        raise KernelBuildError(f"mindglm's CPU kernels are compiled on first use, but the C++ compiler "
                               f"'{compiler}' was not found on PATH: install g++ (e.g. `apt-get install g++`) "
                               f"or point $CXX at one, {PORTABLE_HINT}")
    return path


@lru_cache(maxsize=None)
def library_path(isa: str = None) -> str:
    """Path of the built kernel library (for `isa`, default $MINDGLM_KERNEL_ISA or "native"),
    compiling it if this source/compiler/CPU has none yet."""
    compiler = find_compiler()
    flags = compile_flags(isa=isa)
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        with open(os.path.join(KERNEL_DIR, name), "rb") as fh:
            digest.update(fh.read())
    digest.update(" ".join(flags).encode() + version.encode())
    digest.update(" ".join(sorted(cpu_features() & set(SIMD_FEATURES + ("avx512f",)))).encode())
    folder = os.path.join(cache_dir(), digest.hexdigest()[:16])
    target = os.path.join(folder, "mindglm_kernels.so")
    if os.path.isfile(target):
        return target
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)  # built under a temp name, then renamed
    os.close(fd)
    command = [compiler, *flags, "-o", tmp, *(os.path.join(KERNEL_DIR, s) for s in SOURCES)]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise KernelBuildError(f"compiling mindglm's CPU kernels failed ({' '.join(command)}):\n"
                                   f"{result.stderr.strip()[-2000:]}\nfix the compiler setup, {PORTABLE_HINT}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def kernel_counters(reset: bool = False) -> tuple:
    """(seconds spent inside the kernels, calls) in this process since the last reset; for the
    benchmarks' breakdown of a decode step (kernel time vs MindSpore's own ops and launches)."""
    import ctypes
    lib = ctypes.CDLL(library_path())  # the handle MindSpore opened: same counters
    lib.MindglmKernelNanos.restype = lib.MindglmKernelCalls.restype = ctypes.c_int64
    return lib.MindglmKernelNanos(int(reset)) / 1e9, lib.MindglmKernelCalls(int(reset))


def head_counters(reset: bool = False) -> tuple:
    """(logits the greedy head computed exactly, logits it gave) since the last reset: how often
    its bfloat16 copy decided alone (KernelStackStep's rounded_head)."""
    import ctypes
    lib = ctypes.CDLL(library_path())
    lib.MindglmHeadExact.restype = lib.MindglmHeadLogits.restype = ctypes.c_int64
    return lib.MindglmHeadExact(int(reset)), lib.MindglmHeadLogits(int(reset))


SIMD_LEVELS = ("scalar", "avx2", "avx512")


def kernel_simd(isa: str = None) -> str:
    """The SIMD code the library was compiled with: "scalar", "avx2" or "avx512"."""
    import ctypes
    return SIMD_LEVELS[ctypes.CDLL(library_path(isa)).MindglmKernelsSimd()]
