"""Benchmark `python -m ckpt_convert` on a synthetic ChatGLM2-6B-wide checkpoint of >= 2 GB.

Writes THUDM-format bfloat16 `.bin` shards (6B widths, fewer layers) with ckpt_convert's own
torch-zip writer (no torch), converts them in a subprocess under `/usr/bin/time -v`, and prints
one JSON object: input/output GB, seconds, MB/s and peak RSS, next to the largest tensor's size
(peak RSS should stay near one or two tensors, not the model). Files are deleted afterwards.

    python tools/bench_convert.py [--layers 3] [--workdir /tmp] [--dtype bfloat16] [--keep]
"""
import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mindglm.requirements import require_packages  # noqa: E402

if __name__ == "__main__":
    require_packages(__file__)

import numpy as np  # noqa: E402

from mindglm.io.tensors import cast  # noqa: E402
from mindglm.io.torch_bin import save_torch_bin  # noqa: E402

CONFIG_6B = {
    "_name_or_path": "THUDM/chatglm2-6b", "model_type": "chatglm", "add_bias_linear": False,
    "add_qkv_bias": True, "apply_residual_connection_post_layernorm": False, "ffn_hidden_size": 13696,
    "hidden_size": 4096, "kv_channels": 128, "layernorm_epsilon": 1e-05, "multi_query_attention": True,
    "multi_query_group_num": 2, "num_attention_heads": 32, "padded_vocab_size": 65024,
    "post_layer_norm": True, "rmsnorm": True, "seq_length": 32768, "torch_dtype": "float16",
    "tie_word_embeddings": False, "eos_token_id": 2, "pad_token_id": 0,
}


def thudm_shapes(config: dict) -> list:
    """[(THUDM name, shape)] of a ChatGLM2 checkpoint, in THUDM's order."""
    h, ffn, vocab = config["hidden_size"], config["ffn_hidden_size"], config["padded_vocab_size"]
    qkv = (config["num_attention_heads"] + 2 * config["multi_query_group_num"]) * config["kv_channels"]
    shapes = [("transformer.embedding.word_embeddings.weight", (vocab, h)),
              ("transformer.rotary_pos_emb.inv_freq", (config["kv_channels"] // 4,))]
    for i in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (h,)), (p + "self_attention.query_key_value.weight", (qkv, h)),
                   (p + "self_attention.query_key_value.bias", (qkv,)),
                   (p + "self_attention.dense.weight", (h, config["num_attention_heads"] * config["kv_channels"])),
                   (p + "post_attention_layernorm.weight", (h,)), (p + "mlp.dense_h_to_4h.weight", (2 * ffn, h)),
                   (p + "mlp.dense_4h_to_h.weight", (h, ffn))]
    shapes += [("transformer.encoder.final_layernorm.weight", (h,)), ("transformer.output_layer.weight", (vocab, h))]
    return shapes


def make_checkpoint(folder: str, layers: int, shards: int = 2) -> dict:
    """Write config.json, bf16 .bin shards and their index; return sizes in bytes."""
    config = dict(CONFIG_6B, num_layers=layers)
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    shapes = thudm_shapes(config)
    pool = cast((np.random.default_rng(0).standard_normal(1 << 20) * 0.02).astype(np.float32), "bfloat16")
    sizes = [int(np.prod(s)) * 2 for _, s in shapes]
    bounds = np.searchsorted(np.cumsum(sizes), [sum(sizes) * k / shards for k in range(1, shards)])
    groups = np.split(np.arange(len(shapes)), bounds + 1)
    weight_map = {}
    for k, group in enumerate(groups):
        shard = f"pytorch_model-{k + 1:05d}-of-{len(groups):05d}.bin"
        tensors = ((shapes[i][0], np.resize(pool, shapes[i][1])) for i in group)
        save_torch_bin(os.path.join(folder, shard), tensors)
        weight_map.update({shapes[i][0]: shard for i in group})
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, fh, indent=2)
    input_bytes = sum(os.path.getsize(os.path.join(folder, f)) for f in set(weight_map.values()))
    return {"input_bytes": input_bytes, "largest_tensor_bytes": max(sizes)}


def run_conversion(src: str, dst: str, dtype: "str | None") -> dict:
    """Convert in a subprocess; return wall seconds, conversion seconds and peak RSS (MB)."""
    command = [sys.executable, "-m", "ckpt_convert", "--src", src, "--dst", dst, "--quiet"]
    if dtype:
        command += ["--dtype", dtype]
    timer = os.path.exists("/usr/bin/time")  # Debian package `time`
    if timer:
        command = ["/usr/bin/time", "-v"] + command
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"conversion failed:\n{result.stdout}\n{result.stderr}")
    if timer:
        peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    else:  # no /usr/bin/time (apt-get install time): the kernel's figure for waited-for children
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    seconds = float(re.search(r" in ([\d.]+) s ", result.stdout).group(1))
    return {"wall_seconds": wall, "seconds": seconds, "peak_rss_mb": peak_kb / 1024,
            "measured_with": "/usr/bin/time -v" if timer else "getrusage"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=3, help="layers (3 -> 2.3 GB of bf16 weights)")
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--dtype", default=None, help="--dtype passed to the converter (default: keep bf16)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir)
    try:
        src = os.path.join(work, "chatglm2-synthetic")
        os.makedirs(src)
        start = time.perf_counter()
        made = make_checkpoint(src, args.layers)
        os.sync()  # flush the generated shards so their writeback does not throttle the conversion
        setup = time.perf_counter() - start
        dst = os.path.join(work, "model.ckpt")
        run = run_conversion(src, dst, args.dtype)
        output_bytes = os.path.getsize(dst)
        print(json.dumps({
            "input_gb": round(made["input_bytes"] / 1e9, 3),
            "output_gb": round(output_bytes / 1e9, 3),
            "seconds": round(run["seconds"], 2),
            "wall_seconds": round(run["wall_seconds"], 2),
            "mb_per_s": round(made["input_bytes"] / 1e6 / run["seconds"], 1),
            "peak_rss_mb": round(run["peak_rss_mb"], 1),
            "largest_tensor_mb": round(made["largest_tensor_bytes"] / 1e6, 1),
            "layers": args.layers, "dtype": args.dtype or "bfloat16 (kept)",
            "setup_seconds": round(setup, 1), "measured_with": run["measured_with"],
            "note": "input written (and synced) just before the run, so it is read from the page cache",
        }))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
