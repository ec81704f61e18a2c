"""A ChatGLM2-6B-shaped checkpoint with random weights, and mindglm running it against chatglm.cpp.

`write DIR` makes, one tensor in memory at a time:
  DIR/fp16  THUDM's chatglm2-6b layout: config.json, tokenizer.model, fp16 pytorch_model-0000k-of-
            0000n.bin shards (~2 GB each) and their index;
  DIR/int4  THUDM's chatglm2-6b-int4 layout, made from fp16/ by mindglm's converter
            (`python -m ckpt_convert --src DIR/fp16 --dst DIR/int4 --to-hf --quantize int4`).
`run DIR` times each engine and format in a process of its own, so each peak RSS is its own:
mindglm on fp16/ and on int4/ (FORMATS: what is not int4 stays fp16 as stored, the compute is
float32 through the CPU kernels), on the compiled KV-cache path with one cache row; chatglm.cpp
0.4.2 at f16 and q4_0, its files written by its own converter from the same fp16 shards
(first, each in a process of its own). Each child reports load
seconds, warm prefill seconds, decode tokens/s (best warm run) and peak RSS; the rounds
alternate the engines. JSON on stdout, with the issue's targets.

    python tools/bench_6b.py write /data/glm2-6b-random
    python tools/bench_6b.py run /data/glm2-6b-random
    python tools/bench_6b.py write /tmp/glm --config small     # the same at bench_generate's sizes
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

from mindglm.requirements import require_packages  # noqa: E402

if __name__ == "__main__":
    require_packages(__file__)

import numpy as np  # noqa: E402

TOKENIZER = os.path.join(REPO, "tests", "fixtures", "tokenizers", "tokenizer.model")
THUDM_CONFIG = os.path.join(REPO, "tests", "fixtures", "models", "chatglm2-tiny", "config.json")
SHARD_BYTES = 2 * 10 ** 9
# mindglm's formats: (checkpoint subdir, run-config overrides, chatglm.cpp's type at that precision).
# Everything not quantized stays in the checkpoint's fp16 (param_dtype: float16; the compute is
# float32), as chatglm.cpp keeps it; "int4-output" also quantizes the output layer, as q4_0 does.
FP16_STORAGE = ["model.model_config.param_dtype=float16", "model.model_config.weight_dtype=float16"]
FORMATS = {
    "fp16": ("fp16", FP16_STORAGE, "f16"),
    "int4": ("int4", FP16_STORAGE, "q4_0"),
    "int4-output": ("int4", FP16_STORAGE + ["model.model_config.quantize_output=true"], "q4_0"),
}
TARGET_RSS_MB = {"fp16": 14 * 1024, "int4": 4.5 * 1024, "int4-output": 4.5 * 1024}  # the bounds (GiB)


def model_config(name: str):
    """ChatGLM2-6B's hyper-parameters (configs/glm2/chatglm2_6b.yaml), or bench_generate's sizes."""
    from mindglm.config import GLMConfig
    from mindglm.yaml_config import load_run_config

    if name == "6b":
        config = load_run_config(os.path.join(REPO, "configs", "glm2", "chatglm2_6b.yaml")).model
        return dataclasses.replace(config, compute_dtype="float32", param_dtype="float32")
    from bench_generate import CONFIGS
    return GLMConfig(family="chatglm2", pad_token_id=0, **CONFIGS[name])


# ---------------------------------------------------------------------------------- write
def write_fp16_dir(out: str, config, seed: int = 0) -> dict:
    """THUDM fp16 .bin shards of iter_random_weights(config, seed) in `out` (written to out.tmp,
    then renamed); returns {tensors, bytes, shards, seconds}."""
    from bench_generate import iter_random_weights
    from mindglm.checkpoint import expected_shapes, thudm_name
    from mindglm.io.safetensors_io import split_shards
    from mindglm.io.torch_bin import save_torch_bin

    start = time.perf_counter()
    specs = [(thudm_name(name, "chatglm2"), shape, "float16") for name, shape in expected_shapes(config).items()]
    shards = split_shards(specs, SHARD_BYTES)
    names = [f"pytorch_model-{k + 1:05d}-of-{len(shards):05d}.bin" for k in range(len(shards))]
    arrays = (array.astype(np.float16) for _, array in iter_random_weights(config, seed))
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for shard_name, shard in zip(names, shards):
        save_torch_bin(os.path.join(tmp, shard_name), ((spec[0], next(arrays)) for spec in shard))
    total = sum(int(np.prod(shape, dtype=np.int64)) * 2 for _, shape, _ in specs)
    weight_map = {spec[0]: shard_name for shard_name, shard in zip(names, shards) for spec in shard}
    with open(os.path.join(tmp, "pytorch_model.bin.index.json"), "w", encoding="utf-8") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    with open(THUDM_CONFIG, encoding="utf-8") as fh:
        thudm = json.load(fh)
    thudm.update(_name_or_path="random ChatGLM2 weights (tools/bench_6b.py)", hidden_size=config.hidden_size,
                 num_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
                 kv_channels=config.kv_channels, multi_query_group_num=config.multi_query_group_num,
                 ffn_hidden_size=config.ffn_hidden_size, padded_vocab_size=config.vocab_size,
                 seq_length=config.seq_length)
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(thudm, fh, indent=2)
    shutil.copyfile(TOKENIZER, os.path.join(tmp, "tokenizer.model"))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return {"tensors": len(specs), "bytes": total, "shards": len(shards), "seconds": time.perf_counter() - start}


def write(root: str, config_name: str, seed: int) -> dict:
    from ckpt_convert import convert_to_hf

    config = model_config(config_name)
    report = {"config": config_name, "fp16": write_fp16_dir(os.path.join(root, "fp16"), config, seed)}
    report["int4"] = convert_to_hf(os.path.join(root, "fp16"), os.path.join(root, "int4"), quantize="int4")
    return report


# ---------------------------------------------------------------------------------- run
class LazyState(Mapping):
    """THUDM name -> torch tensor, read from the checkpoint when asked for (chatglm.cpp's
    converter takes one at a time, so a 12 GB model converts in the memory of one tensor)."""

    def __init__(self, src: str):
        from mindglm.io.sources import list_tensors
        self.tensors = {t.name: t for t in list_tensors(src)}

    def __getitem__(self, name):
        import torch
        return torch.from_numpy(self.tensors[name].load())

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)


def ggml_file(root: str, ggml_type: str) -> str:
    """chatglm.cpp's file of root/fp16 at `ggml_type`, converted once and kept in root."""
    from bench_cpp import write_ggml
    from mindglm.config import GLMConfig

    path = os.path.join(root, f"chatglm_cpp_{ggml_type}.bin")
    if not os.path.exists(path):
        src = os.path.join(root, "fp16")
        write_ggml(path, GLMConfig.from_thudm(src), LazyState(src), ggml_type, TOKENIZER)
    return path


def mindglm_session(root: str, fmt: str, max_len: int):
    from bench_cpp import MindglmEngine
    from mindglm.pipeline import load_run_model
    from mindglm.yaml_config import run_config_for_checkpoint

    subdir, overrides, _ = FORMATS[fmt]
    run = run_config_for_checkpoint(os.path.join(root, subdir), overrides + [
        "engine.max_num_seqs=1", f"engine.max_model_len={max_len}", "generation.do_sample=false"])
    return MindglmEngine(load_run_model(run))


def cpp_session(root: str, fmt: str, max_len: int):
    from bench_cpp import CppEngine
    return CppEngine(ggml_file(root, FORMATS[fmt][2]), max_len)


def child(root: str, engine: str, fmt: str, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """One engine and format, timed in this process."""
    from bench_generate import load_average, peak_rss_mb
    from mindglm.config import GLMConfig

    max_len = prompt_len + new_tokens + 8
    if engine == "chatglm.cpp":
        ggml_file(root, FORMATS[fmt][2])          # conversion is not load time (`run` converts before)
    start = time.perf_counter()
    session = (cpp_session if engine == "chatglm.cpp" else mindglm_session)(root, fmt, max_len)
    load_s = time.perf_counter() - start
    vocab = GLMConfig.from_thudm(os.path.join(root, "fp16")).vocab_size
    prompt = np.random.default_rng(1).integers(3, vocab, (1, prompt_len))
    session.generate(prompt, new_tokens)          # warm-up: compiles every graph the runs need
    prefill, rates = [], []
    for _ in range(repeats):
        begin = time.perf_counter()
        _, stamps, _ = session.generate(prompt, new_tokens)
        prefill.append(stamps[0] - begin)
        steps = np.diff(np.asarray(stamps))
        rates.append(len(steps) / float(steps.sum()))
    return {"engine": engine, "format": fmt, "load_s": load_s, "prefill_s": min(prefill),
            "decode_tokens_per_s": max(rates), "runs_tokens_per_s": rates, "peak_rss_mb": peak_rss_mb(),
            "load_average": load_average()}


def run(root: str, formats: list, engines: list, rounds: int, prompt_len: int, new_tokens: int,
        repeats: int) -> dict:
    from bench_generate import cpu_name, load_average
    report = {"root": root, "prompt_len": prompt_len, "new_tokens": new_tokens, "rounds": rounds,
              "cpu": cpu_name(), "cpus": os.cpu_count(), "load_average_start": load_average(), "runs": []}
    if "chatglm.cpp" in engines:
        # chatglm.cpp's files are converted first, each in a process of its own: the converter's
        # memory is no engine's peak RSS (a run's first q4_0 child read 3771 MiB with it, 3291 without).
        for ggml_type in sorted({FORMATS[fmt][2] for fmt in formats}):
            subprocess.run([sys.executable, os.path.abspath(__file__), "convert", root, "--type", ggml_type],
                           check=True, stdout=sys.stderr)   # stdout is the report's
    for _ in range(rounds):
        for fmt in formats:
            for engine in engines:
                cmd = [sys.executable, os.path.abspath(__file__), "child", root, "--engine", engine, "--format", fmt,
                       "--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens), "--repeats", str(repeats)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"bench_6b.py: {engine} {fmt} failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                print(json.dumps(result), file=sys.stderr, flush=True)
                report["runs"].append(result)
    best = {}
    for result in report["runs"]:
        key = (result["engine"], result["format"])
        if key not in best or result["decode_tokens_per_s"] > best[key]["decode_tokens_per_s"]:
            best[key] = result
    report["targets"] = {}
    for fmt in formats:
        mg, cpp = best.get(("mindglm", fmt)), best.get(("chatglm.cpp", fmt))
        entry = {}
        if mg:
            peak = max(r["peak_rss_mb"] for r in report["runs"] if (r["engine"], r["format"]) == ("mindglm", fmt))
            entry.update(mindglm_peak_rss_mb=peak, rss_bound_mb=TARGET_RSS_MB[fmt],
                         rss_within_bound=peak < TARGET_RSS_MB[fmt])
        if mg and cpp:
            entry.update(decode_ratio=mg["decode_tokens_per_s"] / cpp["decode_tokens_per_s"],
                         prefill_ratio=cpp["prefill_s"] / mg["prefill_s"])
        report["targets"][fmt] = entry
    report["load_average_end"] = load_average()
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write DIR/fp16 and DIR/int4")
    w.add_argument("root")
    w.add_argument("--config", choices=("6b", "small", "tiny"), default="6b")
    w.add_argument("--seed", type=int, default=0)
    for name in ("run", "child"):
        p = sub.add_parser(name, help="time the engines" if name == "run" else argparse.SUPPRESS)
        p.add_argument("root")
        p.add_argument("--prompt-len", type=int, default=32)
        p.add_argument("--new-tokens", type=int, default=32)
        p.add_argument("--repeats", type=int, default=2, help="warm runs per child")
        if name == "run":
            p.add_argument("--formats", default=",".join(FORMATS))
            p.add_argument("--engines", default="mindglm,chatglm.cpp")
            p.add_argument("--rounds", type=int, default=1)
        else:
            p.add_argument("--engine", choices=("mindglm", "chatglm.cpp"), required=True)
            p.add_argument("--format", choices=sorted(FORMATS), required=True)
    c = sub.add_parser("convert", help=argparse.SUPPRESS)
    c.add_argument("root")
    c.add_argument("--type", choices=sorted({cpp for _, _, cpp in FORMATS.values()}), required=True)
    args = parser.parse_args(argv)
    if args.command == "convert":
        print(ggml_file(args.root, args.type))
    elif args.command == "write":
        print(json.dumps(write(args.root, args.config, args.seed), indent=1))
    elif args.command == "child":
        print(json.dumps(child(args.root, args.engine, args.format, args.prompt_len, args.new_tokens,
                               args.repeats)))
    else:
        report = run(args.root, args.formats.split(","), args.engines.split(","), args.rounds, args.prompt_len,
                     args.new_tokens, args.repeats)
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
