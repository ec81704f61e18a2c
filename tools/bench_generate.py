"""Generation speed of mindglm's cached runner on a ChatGLM2-shaped model with random weights.

One process, one model: first-token latency including compilation, compile seconds (prefill and
decode graphs), warm prefill seconds, whether a prompt of another length in the same bucket
recompiles, warm decode tokens/s at batch 1 and batch N (default 8), decode steps 1-28 against the
last 28, the cost of going back to batch 1 after batch N, and peak RSS.

With --compare-torch, transformers' GlmForCausalLM (the same network, see the fixtures README,
"A second oracle for ChatGLM2/3") runs the same prompts with the same weights. Its greedy tokens
must equal mindglm's (exit status 1 otherwise); the JSON gets mindglm/torch speed ratios.

Warm runs are repeated (--repeats) with the engines alternating, because a shared machine's load
comes in bursts: `decode_tokens_per_s` is the best run, `median_step_tokens_per_s` the rate of the
median decode step over all runs. Prints one JSON object at the end.

    python tools/bench_generate.py --config tiny
    python tools/bench_generate.py --config small --compare-torch
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

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
def random_weights(config, seed: int) -> dict:
    """mindglm-named float32 arrays: normal * 0.02 for matrices and biases, ones for norms."""
    rng = np.random.default_rng(seed)
    hidden, ffn = config.hidden_size, config.ffn_hidden_size
    qkv_rows = (config.num_attention_heads + 2 * config.multi_query_group_num) * config.kv_channels
    q_size = config.num_attention_heads * config.kv_channels

    def normal(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).astype(np.float32)

    weights = {"embedding.weight": normal(config.vocab_size, hidden)}
    for i in range(config.num_layers):
        p = f"layers.{i}."
        weights[p + "input_norm.weight"] = np.ones(hidden, np.float32)
        weights[p + "attention.qkv.weight"] = normal(qkv_rows, hidden)
        weights[p + "attention.qkv.bias"] = normal(qkv_rows)
        weights[p + "attention.dense.weight"] = normal(hidden, q_size)
        weights[p + "post_attention_norm.weight"] = np.ones(hidden, np.float32)
        weights[p + "mlp.up.weight"] = normal(2 * ffn, hidden)
        weights[p + "mlp.down.weight"] = normal(hidden, ffn)
    weights["final_norm.weight"] = np.ones(hidden, np.float32)
    weights["output.weight"] = normal(config.vocab_size, hidden)
    return weights


def build_mindglm(config, weights):
    from mindglm.models import family_module
    from mindglm.pipeline import GLMModel, load_weights
    network = family_module(config).build_network(config)
    load_weights(network, weights.items(), "random")
    return GLMModel(config, network)


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
    """Fresh model: compilation costs, warm prefill/advance, same-bucket second prompt."""
    result = {}
    runner = model.runner()
    tokens, streamer, start = MindglmEngine(model, 3).generate(prompt1)
    stamps = streamer.stamps
    result["first_token_latency_s"] = stamps[0] - start          # prefill incl. its compilation
    result["first_decode_step_s"] = stamps[1] - stamps[0]          # incl. the decode graph's compilation
    prefill = [timed(runner.start, prompt1, reserve=3)[0] for _ in range(3)]  # the graphs generate() used
    result["prefill_s"] = float(np.median(prefill))
    result["compile_prefill_s"] = result["first_token_latency_s"] - result["prefill_s"]
    token = np.zeros(prompt1.shape[0], np.int64)
    advance = [timed(runner.advance, token)[0] for _ in range(5)]
    result["advance_s"] = float(np.median(advance))
    result["compile_decode_s"] = result["first_decode_step_s"] - result["advance_s"]
    before = set(runner.signatures)
    elapsed, _ = timed(runner.start, prompt1[:, :second_length], reserve=3)
    result["second_prompt"] = {
        "length": int(second_length), "bucket": runner.bucket_for(second_length),
        "same_bucket": runner.bucket_for(second_length) == runner.bucket_for(prompt1.shape[1]),
        "prefill_s": elapsed, "prefill_over_warm_prefill": elapsed / result["prefill_s"],
        "recompiled": set(runner.signatures) != before,
        "new_signatures": sorted(map(str, set(runner.signatures) - before))}
    return result


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
              "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "mindspore": ms.__version__}}

    report["random_weights_s"], weights = timed(random_weights, config, args.seed)
    n_params = sum(a.size for a in weights.values())
    report.update(parameters=int(n_params), weights_gb_fp32=n_params * 4 / 1e9)
    report["build_and_load_s"], model = timed(build_mindglm, config, weights)

    rng = np.random.default_rng(args.seed + 1)
    prompt1 = rng.integers(3, config.vocab_size, (1, args.prompt_len), dtype=np.int64)
    prompt_n = rng.integers(3, config.vocab_size, (args.batch, args.prompt_len), dtype=np.int64)

    mg = cold_start(model, prompt1, second)
    report["cache_length"] = model.runner().cache_length
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
    # Back to batch 1 after batch N: does the runner rebuild (and recompile) its graphs?
    before = set(model.runner().signatures)
    _, streamer, start = engines[0].generate(prompt1, 2)
    mg["batch1_after_batch_n"] = {"first_token_s": streamer.stamps[0] - start,
                                  "second_token_s": streamer.stamps[1] - start,
                                  "new_signatures": len(set(model.runner().signatures) - before)}

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
