"""Command line: `python -m ckpt_convert --help`."""
import argparse
import errno
import re
import signal
import sys

from ckpt_convert.convert import DEFAULT_SHARD_BYTES, convert, convert_to_hf
from mindglm.io.tensors import CAST_TARGETS
from mindglm.checkpoint import CheckpointError
from mindglm.config import ConfigError


def _size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 2GB or 500MB")
    unit = (match[2] or "B").upper().rstrip("B").rstrip("I")
    return int(float(match[1]) * {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}[unit])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ckpt_convert",
        description="Convert THUDM ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B weights (PyTorch .bin or "
                    ".safetensors, or a MindFormers .ckpt) into a mindglm MindSpore .ckpt, or back "
                    "with --to-hf. One tensor is held in memory at a time.")
    parser.add_argument("--src", required=True, help="model directory or weight file to read")
    parser.add_argument("--dst", required=True, help="output .ckpt file (with --to-hf: output directory)")
    parser.add_argument("--to-hf", action="store_true",
                        help="write THUDM-named .safetensors shards + index into --dst instead")
    parser.add_argument("--config", help="THUDM config.json or its directory (default: next to --src)")
    parser.add_argument("--dtype", help=f"cast float tensors to one of {', '.join(CAST_TARGETS)} "
                                        "(default: keep each tensor's dtype)")
    parser.add_argument("--quantize", choices=("int8", "int4"),
                        help="weight-only quantization of the layers' matrices, THUDM's format and rounding "
                             "(per-row fp16 scales)")
    parser.add_argument("--quantize-output", action="store_true",
                        help="with --quantize: the output layer too (ChatGLM2/3; THUDM never does)")
    parser.add_argument("--max-shard-size", type=_size, default=DEFAULT_SHARD_BYTES,
                        help="with --to-hf: largest shard (default 2GB)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    return parser


def _progress(index, total, name, array):
    dtype = "bfloat16" if array.dtype.str == "<u2" else str(array.dtype)
    print(f"[{index:4d}/{total}] {name} {tuple(array.shape)} {dtype} {array.nbytes / 1e6:.1f} MB",
          file=sys.stderr, flush=True)


# Write errors the user fixes by choosing another --dst (or making room), not by fixing the source.
_DST_ERRORS = {
    errno.ENOSPC: "the disk is full: free space there or pass a --dst on another disk",
    errno.EDQUOT: "the disk quota is exceeded: free space there or pass a --dst on another disk",
    errno.EROFS: "that file system is read-only: pass a --dst in a writable directory",
    errno.EACCES: "permission denied: pass a --dst in a directory you can write to",
    errno.EPERM: "permission denied: pass a --dst in a directory you can write to",
}


def _describe(exc: OSError, dst: str) -> str:
    """The message for an OSError: a write failure names --dst and the fix."""
    on_dst = exc.filename is None or str(exc.filename).startswith(dst)
    if exc.errno in _DST_ERRORS and on_dst:
        return f"cannot write --dst {dst}: {_DST_ERRORS[exc.errno]} ({exc.strerror})"
    return str(exc)


def _terminate(signum, frame):
    raise KeyboardInterrupt  # unwinds like Ctrl-C: the writers remove their .tmp files


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    progress = None if args.quiet else _progress
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.to_hf:
            stats = convert_to_hf(args.src, args.dst, config=args.config, dtype=args.dtype,
                                  max_shard_bytes=args.max_shard_size, progress=progress,
                                  quantize=args.quantize, quantize_output=args.quantize_output)
        else:
            stats = convert(args.src, args.dst, dtype=args.dtype, config=args.config, progress=progress,
                            quantize=args.quantize, quantize_output=args.quantize_output)
    except (CheckpointError, ConfigError) as exc:
        print(f"ckpt_convert: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"ckpt_convert: error: {_describe(exc, args.dst)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ckpt_convert: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    seconds = max(stats["seconds"], 1e-9)
    print(f"wrote {args.dst}: {stats['tensors']} tensors, {stats['bytes'] / 1e9:.3f} GB in {seconds:.1f} s "
          f"({stats['bytes'] / 1e6 / seconds:.0f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
