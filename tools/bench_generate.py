"""Generation speed of mindglm's engine on a ChatGLM2-shaped model with random weights.

One process, one model: first-token latency including compilation, compile seconds (prefill and
decode graphs), warm prefill seconds, whether prompts of other lengths recompile, warm decode
tokens/s at batch 1 and batch N (default 8), decode steps 1-28 against the last 28, batch 1 with
THUDM's default budget (max_length = the context) against max_new_tokens, N sequences arriving
one after another (continuous batching: the tokens/s once all run, and the first-token latency
of one joining a running batch against its prefill time + one decode step), the graphs compiled
after warm-up, the KV cache's size and peak RSS.

--quantize int8|int4|fp16|fp32 builds mindglm with that weight format (fp32/fp16 through the CPU
kernels; default: fp32 weights and MindSpore's MatMul). --compare-cpp runs tools/bench_cpp.py
instead: batch-1 decode of each format against chatglm.cpp q8_0/q4_0/f16/f32 in the same run;
--decode-steps K gives mindglm's engine K greedy decode steps per model call there.

With --compare-torch, transformers' GlmForCausalLM (the same network, see the fixtures README,
"A second oracle for ChatGLM2/3") runs the same prompts with the same weights. Its greedy tokens
must equal mindglm's (exit status 1 otherwise); the JSON gets mindglm/torch speed ratios.

Warm runs are repeated (--repeats) with the engines alternating, because a shared machine's load
comes in bursts: `decode_tokens_per_s` is the best run, `median_step_tokens_per_s` the rate of the
median decode step over all runs. Prints one JSON object at the end.

    python tools/bench_generate.py --config tiny
    python tools/bench_generate.py --config small --compare-torch
    python tools/bench_generate.py --config small --quantize int4
    python tools/bench_generate.py --config small --compare-cpp

--tensor-parallel N (under `msrun --worker_num=N --local_worker_num=N ...`) builds the model split
over the N ranks and, in the same run, whole in each rank: warm decode tokens/s of both at batch
1 and batch N (the split model with every rank stepping together; then the whole one on rank 0
while the others wait), and each rank's peak RSS with its share (before the whole model is built).
Greedy tokens of the two must be equal (exit status 1 otherwise). Rank 0 prints the JSON.

    msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --join=True \
        tools/bench_generate.py --config small --tensor-parallel 2
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

from mindglm.requirements import require_packages  # noqa: E402

if __name__ == "__main__":
    require_packages(__file__)

import numpy as np  # noqa: E402

CONFIGS = {
    "tiny": dict(hidden_size=64, num_layers=2, num_attention_heads=4, kv_channels=16,
                 multi_query_group_num=2, ffn_hidden_size=160, vocab_size=1000, seq_length=256),
    "small": dict(hidden_size=1024, num_layers=8, num_attention_heads=16, kv_channels=64,
                  multi_query_group_num=2, ffn_hidden_size=2816, vocab_size=65024, seq_length=2048),
    "mid": dict(hidden_size=2048, num_layers=12, num_attention_heads=16, kv_channels=128,
                multi_query_group_num=2, ffn_hidden_size=5632, vocab_size=65024, seq_length=2048),
}
WINDOW = 28  # tokens per early/late window


# ---------------------------------------------------------------------------------- weights
def iter_random_weights(config, seed: int):
    """(mindglm name, float32 array) for every tensor of `config`'s checkpoint, one at a time:
    normal * 0.02 for matrices and biases, ones for norms. Tensor k is drawn from its own stream
    (seed, k), so a model of any size is written without holding more than one tensor."""
    from mindglm.checkpoint import expected_shapes

    for k, (name, shape) in enumerate(expected_shapes(config).items()):
        if "norm." in name:
            yield name, np.ones(shape, np.float32)
            continue
        array = np.random.default_rng([seed, k]).standard_normal(shape, dtype=np.float32)
        array *= np.float32(0.02)
        yield name, array


def random_weights(config, seed: int) -> dict:
    """All of iter_random_weights as a dict (models that fit in memory)."""
    return dict(iter_random_weights(config, seed))


def build_mindglm(config, weights, fmt=None):
    """Build -> rewrite (the weight format) -> load, as mindglm.load_model does."""
    from bench_cpp import build_mindglm as build_format
    return build_format(config, weights, fmt or "matmul")


def build_torch(config, weights):
    """transformers' GlmForCausalLM holding the same weights (float32, eval mode)."""
    import torch
    from transformers import GlmConfig, GlmForCausalLM

    hf_config = GlmConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.multi_query_group_num,
        head_dim=config.kv_channels, rms_norm_eps=config.layernorm_epsilon, attention_bias=True,
        rope_parameters={"partial_rotary_factor": 0.5, "rope_theta": 10000.0, "rope_type": "default"},
        tie_word_embeddings=False, max_position_embeddings=config.seq_length,
        pad_token_id=0, eos_token_id=None, bos_token_id=None)
    model = GlmForCausalLM(hf_config)
    q = config.num_attention_heads * config.kv_channels
    k = config.multi_query_group_num * config.kv_channels
    state = {"model.embed_tokens.weight": weights["embedding.weight"],
             "model.norm.weight": weights["final_norm.weight"],
             "lm_head.weight": weights["output.weight"]}
    for i in range(config.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            fused = weights[src + f"attention.qkv.{kind}"]
            state[dst + f"self_attn.q_proj.{kind}"] = fused[:q]
            state[dst + f"self_attn.k_proj.{kind}"] = fused[q:q + k]
            state[dst + f"self_attn.v_proj.{kind}"] = fused[q + k:]
        state[dst + "self_attn.o_proj.weight"] = weights[src + "attention.dense.weight"]
        state[dst + "mlp.gate_up_proj.weight"] = weights[src + "mlp.up.weight"]
        state[dst + "mlp.down_proj.weight"] = weights[src + "mlp.down.weight"]
        state[dst + "input_layernorm.weight"] = weights[src + "input_norm.weight"]
        state[dst + "post_attention_layernorm.weight"] = weights[src + "post_attention_norm.weight"]
    tensors = {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in state.items()}
    result = model.load_state_dict(tensors, strict=True)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"GlmForCausalLM weights do not match: {result}")
    model.eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    return model


# ---------------------------------------------------------------------------------- timing
class StampStreamer:
    """Timestamps every put (mindglm's Streamer protocol; transformers' too, see skip_first)."""

    def __init__(self, skip_first: bool = False):
        self.skip_first = skip_first  # transformers puts the prompt first
        self.stamps = []

    def put(self, tokens):
        if self.skip_first:
            self.skip_first = False
            return
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


def mindglm_streamer():
    from mindglm.generation.streamers import Streamer

    class MindglmStamps(StampStreamer, Streamer):
        pass

    return MindglmStamps()


def step_seconds(stamps) -> np.ndarray:
    """stamps[i] is when new token i+1 was chosen; stamps[0] follows prefill, so the decode step
    that produced token i+1 (i >= 1) took stamps[i] - stamps[i-1]."""
    return np.diff(np.asarray(stamps))


def summarize(runs: list, batch: int) -> dict:
    """Decode speed over repeated runs (lists of step seconds).

    The machine may be shared, so besides each run's mean rate (tokens / decode time) this gives
    the best run and rates from median step times, which one busy moment does not move much.
    Early/late compare the first and the last WINDOW decode steps (medians over all runs).
    """
    per_run = [batch * len(steps) / float(steps.sum()) for steps in runs]
    all_steps = np.concatenate(runs)
    out = {"decode_tokens_per_s": max(per_run), "runs_tokens_per_s": per_run,
           "median_step_ms": float(np.median(all_steps) * 1e3), "min_step_ms": float(all_steps.min() * 1e3),
           "median_step_tokens_per_s": batch / float(np.median(all_steps))}
    length = min(len(steps) for steps in runs)
    if length >= 2 * WINDOW:
        early = np.concatenate([steps[:WINDOW] for steps in runs])
        late = np.concatenate([steps[length - WINDOW:length] for steps in runs])
        out["early_tokens_per_s"] = batch / float(np.median(early))  # decode steps 1..28
        out["late_tokens_per_s"] = batch / float(np.median(late))    # the last 28 steps
        out["late_over_early"] = out["late_tokens_per_s"] / out["early_tokens_per_s"]
    return out


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def load_average() -> list:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def cpu_name() -> str:
    """The CPU's model name: ratios from two machines are not comparable."""
    from mindglm.kernels.build import cpuinfo_field
    return cpuinfo_field("model name") or platform.processor()


def tensor_parallel_bench(config, weights, args, report) -> int:
    """--tensor-parallel: the split model against the whole one, on every rank of the launch."""
    from mindspore import Tensor, ops
    from mindglm.loading import build_rewritten_network, load_weights
    from mindglm.parallel.context import init_tensor_parallel
    from mindglm.parallel.lockstep import run_front_end
    from mindglm.pipeline import GLMModel

    context = init_tensor_parallel(args.tensor_parallel)
    rng = np.random.default_rng(args.seed + 1)
    prompt1 = rng.integers(3, config.vocab_size, (1, args.prompt_len), dtype=np.int64)
    prompt_n = rng.integers(3, config.vocab_size, (args.batch, args.prompt_len), dtype=np.int64)
    gather = ops.AllGather()

    def per_rank(value: float) -> list:
        return [float(v) for v in gather(Tensor(np.array([value], np.float32))).asnumpy()]

    def run(model) -> tuple:
        engine = MindglmEngine(model, args.new_tokens)
        engine.generate(prompt1, 4)
        engine.generate(prompt_n, 4)             # compiles the batch-1 and batch-N graphs
        results = {}
        for key, prompt in (("batch1", prompt1), ("batch_n", prompt_n)):
            summaries, tokens = measure([engine], prompt, args.repeats)
            results[key] = dict(summaries["mindglm"], tokens=tokens["mindglm"])
        return results

    start = time.perf_counter()
    network = build_rewritten_network(config, context)
    load_weights(network, weights.items(), "random")
    split = GLMModel(config, network, parallel=context)
    build_s = time.perf_counter() - start
    split_results = run(split)
    report["tensor_parallel"] = {
        "world": context.world, "build_and_load_s_per_rank": per_rank(build_s),
        "peak_rss_mb_per_rank": per_rank(peak_rss_mb()),   # the rank's share, its cache and graphs
        "decode_tokens_per_s": {k: per_rank(v["decode_tokens_per_s"]) for k, v in split_results.items()},
        "median_step_tokens_per_s": {k: per_rank(v["median_step_tokens_per_s"]) for k, v in split_results.items()}}

    def whole_alone() -> int:
        """Rank 0: the whole model, with the other ranks idle (following over lockstep's socket,
        not waiting in a collective, which would time out)."""
        whole_results = run(build_mindglm(config, weights, args.quantize))
        report["single_process"] = {k: {m: v[m] for m in ("decode_tokens_per_s", "median_step_tokens_per_s")}
                                    for k, v in whole_results.items()}
        report["tokens_identical"] = {k: bool(np.array_equal(whole_results[k]["tokens"], split_results[k]["tokens"]))
                                      for k in whole_results}
        report["ratio_split_over_single"] = {
            k: split_results[k]["decode_tokens_per_s"] / whole_results[k]["decode_tokens_per_s"]
            for k in whole_results}
        report["peak_rss_mb_rank0_with_both_models"] = peak_rss_mb()
        report["load_average_end"] = load_average()
        print(json.dumps(report, indent=1, default=float))
        if not all(report["tokens_identical"].values()):
            print("FAILED: the split model's greedy tokens differ from the whole one's", file=sys.stderr)
            return 1
        return 0

    return run_front_end(split, whole_alone) or 0


# ---------------------------------------------------------------------------------- engines
class MindglmEngine:
    name = "mindglm"

    def __init__(self, model, new_tokens: int):
        self.model, self.new_tokens = model, new_tokens

    def generate(self, prompt, new_tokens=None):
        """(tokens [batch, prompt + new], StampStreamer, start time)."""
        streamer = mindglm_streamer()
        start = time.perf_counter()
        tokens = self.model.generate(prompt, max_new_tokens=new_tokens or self.new_tokens, eos_token_id=-1,
                                     streamer=streamer)
        return tokens, streamer, start


class TorchEngine:
    name = "torch"

    def __init__(self, model, new_tokens: int):
        self.model, self.new_tokens = model, new_tokens

    def generate(self, prompt, new_tokens=None):
        import torch
        n = new_tokens or self.new_tokens
        streamer = StampStreamer(skip_first=True)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(torch.from_numpy(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                                      do_sample=False, num_beams=1, max_new_tokens=n, min_new_tokens=n,
                                      eos_token_id=None, pad_token_id=0, streamer=streamer,
                                      temperature=None, top_p=None, top_k=None)
        return out.numpy(), streamer, start


def cold_start(model, prompt1, second_length: int) -> dict:
    """Fresh model: compilation costs, warm prefill and decode step, prompts of other lengths."""
    result = {}
    engine = MindglmEngine(model, 3)
    _, streamer, start = engine.generate(prompt1)
    result["first_token_latency_s"] = streamer.stamps[0] - start        # prefill incl. its compilation
    result["first_decode_step_s"] = streamer.stamps[1] - streamer.stamps[0]  # incl. the decode graph's
    warm = []
    for _ in range(3):
        _, streamer, start = engine.generate(prompt1)
        warm.append((streamer.stamps[0] - start, streamer.stamps[1] - streamer.stamps[0]))
    result["prefill_s"] = float(np.median([w[0] for w in warm]))
    result["advance_s"] = float(np.median([w[1] for w in warm]))
    result["compile_prefill_s"] = result["first_token_latency_s"] - result["prefill_s"]
    result["compile_decode_s"] = result["first_decode_step_s"] - result["advance_s"]
    for key, length in (("second_prompt", second_length), ("third_prompt", max(1, second_length // 2))):
        before = model.engine.compiles
        _, streamer, start = engine.generate(prompt1[:, :length])
        result[key] = {"length": int(length), "prefill_s": streamer.stamps[0] - start,
                       "graphs_compiled": model.engine.compiles - before}
    return result


def thudm_budget(model, prompt1, steps: int) -> dict:
    """Batch-1 decode with THUDM's chat() budget (max_length = the context) against max_new_tokens:
    the engine's window follows the row's length, not its budget, so both should run alike."""
    from mindglm.generation.config import GenerationConfig
    engine = model.engine
    rates = {}
    for key, config in (("max_length_context", GenerationConfig(max_length=model.config.seq_length, eos_token_id=-1)),
                        ("max_new_tokens", GenerationConfig(max_new_tokens=steps + 1, eos_token_id=-1))):
        seq = engine.add_request(prompt1[0], config)
        engine.step()
        stamps = []
        while len(seq.output_ids) <= steps:
            engine.step()
            stamps.append(time.perf_counter())
        engine.abort(seq.request_id)
        rates[key] = 1.0 / float(np.median(np.diff(stamps)))
    rates["ratio"] = rates["max_length_context"] / rates["max_new_tokens"]
    return rates


def continuous_arrivals(model, prompts, steps_between: int, new_tokens: int) -> dict:
    """Sequences arriving one after another (one every `steps_between` decode steps), not
    together: decode tokens/s once all of them run, against one alone, and the first-token
    latency of each joining sequence against its prefill time plus one decode step."""
    from mindglm.generation.config import GenerationConfig
    engine = model.engine
    config = GenerationConfig(max_new_tokens=new_tokens, eos_token_id=-1)
    alone = engine.add_request(prompts[0], config)
    stamps = []
    while not alone.finished:
        engine.step()
        stamps.append(time.perf_counter())
    alone_rate = 1.0 / float(np.median(np.diff(stamps[1:])))
    seqs, joins = [], []
    for prompt in prompts:
        start = time.perf_counter()
        seqs.append(engine.add_request(prompt, config))
        engine.step()
        joins.append(time.perf_counter() - start)
        for _ in range(steps_between):
            engine.step()
    step_times = []
    while sum(len(s.output_ids) for s in seqs) < len(seqs) * new_tokens and all(not s.finished for s in seqs):
        start = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - start)
    engine.run_until_done(seqs)
    all_rate = len(seqs) / float(np.median(step_times))
    return {"sequences": len(seqs), "steps_between_arrivals": steps_between,
            "alone_tokens_per_s": alone_rate, "all_running_tokens_per_s": all_rate,
            "ratio": all_rate / alone_rate,
            "join_first_token_s_median": float(np.median(joins[1:])), "join_first_token_s_max": float(max(joins[1:]))}


def measure(engines: list, prompt, repeats: int) -> tuple:
    """Warm runs, engines alternating so a busy spell on a shared machine hits both.
    Returns ({engine: summary}, {engine: tokens of its last run})."""
    steps = {e.name: [] for e in engines}
    tokens = {}
    for _ in range(repeats):
        for engine in engines:
            out, streamer, _ = engine.generate(prompt)
            if engine.name in tokens and not np.array_equal(tokens[engine.name], out):
                raise SystemExit(f"{engine.name}: two greedy runs of the same prompt differ")
            tokens[engine.name] = out
            steps[engine.name].append(step_seconds(streamer.stamps))
    return {name: summarize(runs, prompt.shape[0]) for name, runs in steps.items()}, tokens


def compare_tokens(name: str, ours: np.ndarray, theirs: np.ndarray, prompt_length: int, model) -> dict:
    """Equal greedy tokens? On a mismatch, the exact (no-cache) path's top-2 margin there."""
    if ours.shape == theirs.shape and np.array_equal(ours, theirs):
        return {"identical": True}
    report = {"identical": False, "mindglm_shape": list(ours.shape), "torch_shape": list(theirs.shape)}
    steps = min(ours.shape[1], theirs.shape[1])
    diff = np.argwhere(ours[:, :steps] != theirs[:, :steps])
    if len(diff):
        row, col = map(int, diff[np.lexsort((diff[:, 0], diff[:, 1]))][0])
        report.update(row=row, new_token_index=col - prompt_length, mindglm=int(ours[row, col]),
                      torch=int(theirs[row, col]), rows_differing=int(len(np.unique(diff[:, 0]))))
        logits = model.logits(ours[row:row + 1, :col])[0, -1]
        top = np.sort(logits)[-2:]
        report["exact_path_top2_margin"] = float(top[1] - top[0])
        report["exact_path_argmax"] = int(np.argmax(logits))
    print(f"MISMATCH ({name}): mindglm and transformers greedy tokens differ: {report}", file=sys.stderr)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--second-prompt-len", type=int, default=None,
                        help="length of the same-bucket second prompt (default: prompt-len - 7)")
    parser.add_argument("--batch", type=int, default=8, help="the larger batch size (batch 1 always runs)")
    parser.add_argument("--repeats", type=int, default=2, help="warm measured runs per engine and batch")
    parser.add_argument("--compare-torch", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="MindSpore CPU kernel threads and torch.set_num_threads (default: library defaults)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quantize", choices=("int8", "int4", "fp16", "fp32"), default=None,
                        help="mindglm's weight format (fp32/fp16: CPU kernels); default fp32 + MindSpore MatMul")
    parser.add_argument("--compare-cpp", action="store_true",
                        help="batch-1 decode against chatglm.cpp at the same precision, for --quantize or "
                             "all four formats (needs chatglm-cpp==0.4.2 and torch)")
    parser.add_argument("--decode-steps", type=int, default=1,
                        help="with --compare-cpp: mindglm's engine.decode_steps (greedy decode steps per call)")
    parser.add_argument("--tokenizer", default=os.path.join(REPO, "tests", "fixtures", "tokenizers", "tokenizer.model"),
                        help="with --compare-cpp: the ChatGLM2 tokenizer.model written into chatglm.cpp's file")
    parser.add_argument("--tensor-parallel", type=int, default=1,
                        help="under msrun: the model split over this many ranks, next to the whole one")
    args = parser.parse_args(argv)
    if args.compare_torch:
        from mindglm.requirements import missing_packages
        missing = missing_packages({"torch": "torch", "transformers": "transformers"})
        if missing:
            print(f"bench_generate.py: error: --compare-torch needs {' and '.join(missing)} (optional reference "
                  "packages): run `make reference`", file=sys.stderr)
            return 2
    if args.new_tokens < 2 * WINDOW + 2:
        parser.error(f"--new-tokens must be at least {2 * WINDOW + 2} (early/late windows of {WINDOW})")

    import mindspore as ms
    if args.threads is not None:
        ms.device_context.cpu.op_tuning.threads_num(args.threads)
    from mindglm.config import GLMConfig

    config = GLMConfig(family="chatglm2", use_past=True, pad_token_id=0, **CONFIGS[args.config])
    if args.prompt_len + args.new_tokens > config.seq_length:
        parser.error(f"prompt-len + new-tokens exceeds seq_length {config.seq_length}")
    second = args.second_prompt_len or max(1, args.prompt_len - 7)
    report = {"config": args.config, "model": CONFIGS[args.config], "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "batch": args.batch, "repeats": args.repeats,
              "threads": args.threads, "load_average_start": load_average(),
              "host": {"cpus": os.cpu_count(), "cpu": cpu_name(), "python": platform.python_version(),
                       "mindspore": ms.__version__}}

    report["random_weights_s"], weights = timed(random_weights, config, args.seed)
    n_params = sum(a.size for a in weights.values())
    report.update(parameters=int(n_params), weights_gb_fp32=n_params * 4 / 1e9, quantize=args.quantize)
    if args.tensor_parallel > 1:
        if args.quantize:
            from bench_cpp import PAIRS
            config = dataclasses.replace(config, **PAIRS[args.quantize][0])
        return tensor_parallel_bench(config, weights, args, report)
    if args.compare_cpp:
        from bench_cpp import compare
        from mindglm.kernels.build import kernel_simd
        prompt = np.random.default_rng(args.seed + 1).integers(3, config.vocab_size, (1, args.prompt_len))
        formats = [args.quantize] if args.quantize else ["fp32", "fp16", "int8", "int4", "matmul"]
        report["kernels_simd"] = kernel_simd()
        report["decode_steps"] = args.decode_steps
        report["compare_cpp"] = compare(config, weights, formats, prompt, args.new_tokens, args.repeats,
                                        args.tokenizer, load_average, args.decode_steps)
        report["ratios"] = {fmt: entry["ratio"] for fmt, entry in report["compare_cpp"].items()}
        report["peak_rss_mb"] = peak_rss_mb()
        report["load_average_end"] = load_average()
        print(json.dumps(report, indent=1, default=float))
        return 0
    report["build_and_load_s"], model = timed(build_mindglm, config, weights, args.quantize)

    rng = np.random.default_rng(args.seed + 1)
    prompt1 = rng.integers(3, config.vocab_size, (1, args.prompt_len), dtype=np.int64)
    prompt_n = rng.integers(3, config.vocab_size, (args.batch, args.prompt_len), dtype=np.int64)

    mg = cold_start(model, prompt1, second)
    engine_config = model.engine_config
    report["engine"] = {"max_num_seqs": engine_config.max_num_seqs, "max_model_len": model.max_model_len,
                        "kv_cache_mb": 2 * config.num_layers * (engine_config.max_num_seqs + 1) * model.max_model_len
                        * config.kv_heads * config.head_dim * 4 / 2 ** 20}
    engines = [MindglmEngine(model, args.new_tokens)]
    if args.compare_torch:
        import torch
        import transformers
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        report["host"].update(torch=torch.__version__, transformers=transformers.__version__,
                              torch_threads=torch.get_num_threads())
        report["torch_build_s"], hf = timed(build_torch, config, weights)
        engines.append(TorchEngine(hf, args.new_tokens))
        _, streamer, start = engines[1].generate(prompt1, 4)
        report["torch_first_token_latency_s"] = streamer.stamps[0] - start

    results, tokens = {}, {}
    results["batch1"], tokens["batch1"] = measure(engines, prompt1, args.repeats)
    _, streamer, start = engines[0].generate(prompt_n, 2)                # compiles the batch-N graphs
    mg["batch_n_first_token_latency_s"] = streamer.stamps[0] - start
    mg["batch_n_compile_s"] = streamer.stamps[1] - start
    for engine in engines[1:]:
        engine.generate(prompt_n, 4)
    results["batch_n"], tokens["batch_n"] = measure(engines, prompt_n, args.repeats)
    # Back to batch 1 after batch N: the cache pool and graphs stay; nothing is rebuilt.
    before = model.engine.compiles
    _, streamer, start = engines[0].generate(prompt1, 2)
    mg["batch1_after_batch_n"] = {"first_token_s": streamer.stamps[0] - start,
                                  "second_token_s": streamer.stamps[1] - start,
                                  "graphs_compiled": model.engine.compiles - before}
    mg["thudm_default_budget_batch1"] = thudm_budget(model, prompt1, WINDOW)
    start = time.perf_counter()
    mg["warmup_graphs_compiled"] = model.engine.warmup()
    mg["warmup_s"] = time.perf_counter() - start
    before = model.engine.compiles
    if len(prompt_n) > 1:   # sequences joining running ones: needs a batch of two or more
        mg["continuous_arrivals"] = continuous_arrivals(model, list(prompt_n), 4, args.new_tokens)
    mg["graphs_compiled_after_warmup"] = model.engine.compiles - before

    for engine in engines:
        entry = mg if engine.name == "mindglm" else report.setdefault("torch", {})
        entry["batch1"] = results["batch1"][engine.name]
        entry["batch_n"] = results["batch_n"][engine.name]
        entry["batch_n_over_batch1"] = (entry["batch_n"]["decode_tokens_per_s"]
                                        / entry["batch1"]["decode_tokens_per_s"])
    report["mindglm"] = mg
    status = 0
    if args.compare_torch:
        report["tokens_match"] = {
            key: compare_tokens(key, tokens[key]["mindglm"], tokens[key]["torch"], args.prompt_len, model)
            for key in ("batch1", "batch_n")}
        if not all(v["identical"] for v in report["tokens_match"].values()):
            status = 1
        th = report["torch"]
        report["ratio_mindglm_over_torch"] = {
            f"decode_{key}": mg[key]["decode_tokens_per_s"] / th[key]["decode_tokens_per_s"]
            for key in ("batch1", "batch_n")}
        report["ratio_mindglm_over_torch"].update({
            f"median_step_{key}": mg[key]["median_step_tokens_per_s"] / th[key]["median_step_tokens_per_s"]
            for key in ("batch1", "batch_n")})
    report["peak_rss_mb"] = peak_rss_mb()
    report["load_average_end"] = load_average()
    print(json.dumps(report, indent=1, default=float))
    if status:
        print("FAILED: greedy tokens differ between mindglm and transformers (see tokens_match)", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
