#!/usr/bin/env python
"""Serving benchmark, as vLLM's benchmark_serving.py: N streamed requests against tools/serve.py.

Each request is a /v1/completions stream of `--input-len` random prompt token ids that generates
exactly `--output-len` tokens (ignore_eos), greedy. Requests run at a fixed concurrency
(`--max-concurrency`) or arrive as a Poisson process (`--request-rate` per second). Reported, as
JSON: time to first token (TTFT), time per output token after the first (TPOT), inter-token
latency (ITL) and end-to-end latency (mean / p50 / p99, ms), request and token throughputs, and
the graphs the engine compiled during the run (warm-up excluded; it should be 0).

The server is started by this script (`--model small` builds the `small` benchmark model of
tools/bench_generate.py with random weights and the real ChatGLM2 tokenizer; `--config YAML`
serves a real run config), or `--base-url` points at one already running. `--compare-serial`
runs the same load against the same server started with `--max-num-seqs 1` — one request at a
time, what THUDM's and chatglm.cpp's servers do — and reports the ratios. `--engine-baseline`
then times the engine's batch-1 decode step in-process on the same model, without HTTP.
Before the load, `--solo-requests` requests run alone (the TTFT and TPOT of one stream) and one
prompt of `--chunk-size` tokens (one prefill chunk); `targets` compares the run with the goals:
batched/serial output tokens/s, one stream's TPOT over the engine's step, p99 TTFT under load
against 2 x the single TTFT + one chunk, and graphs compiled after warm-up.

    python tools/bench_serve.py --model small --num-prompts 32 --max-concurrency 8 --compare-serial
    python tools/bench_serve.py --model small --num-prompts 16 --request-rate 2
    python tools/bench_serve.py --base-url http://127.0.0.1:8000 --num-prompts 64
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

TOKENIZER = os.path.join(REPO, "tests", "fixtures", "tokenizers", "tokenizer.model")  # ChatGLM2-6B's own


# ---------------------------------------------------------------------------------- the model
def benchmark_model(name: str, work_dir: str, seed: int = 0) -> str:
    """A run config for tools/bench_generate.py's `name` model (random weights, written once)."""
    import yaml
    from bench_generate import CONFIGS, random_weights
    from mindglm.config import GLMConfig

    os.makedirs(work_dir, exist_ok=True)
    config_path = os.path.join(work_dir, f"{name}.yaml")
    checkpoint = os.path.join(work_dir, f"{name}-seed{seed}.ckpt")
    if not os.path.exists(checkpoint):
        import mindspore as ms
        config = GLMConfig(family="chatglm2", use_past=True, pad_token_id=0, **CONFIGS[name])
        weights = random_weights(config, seed)
        partial = checkpoint[:-len(".ckpt")] + ".partial.ckpt"  # save_checkpoint insists on .ckpt
        ms.save_checkpoint([{"name": key, "data": ms.Tensor(value)} for key, value in weights.items()], partial)
        os.replace(partial, checkpoint)
    run_config = {
        "model": {"family": "chatglm2", "model_config": {**CONFIGS[name], "use_past": True, "pad_token_id": 0,
                                                         "compute_dtype": "float32", "param_dtype": "float32"}},
        "processor": {"tokenizer": TOKENIZER}, "checkpoint": checkpoint,
        "generation": {"do_sample": False}}
    with open(config_path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(run_config, handle)
    return config_path


# ---------------------------------------------------------------------------------- the server
class Server:
    """tools/serve.py on 127.0.0.1 (a free port), stopped with SIGTERM."""

    def __init__(self, config: str, max_num_seqs: int, log_path: str, extra=()):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, os.path.join(REPO, "tools", "serve.py"), "--config", config, "--port", str(port),
                   "--max-num-seqs", str(max_num_seqs), "--log-level", "warning", *extra]
        self.log = open(log_path, "wb")
        start = time.monotonic()
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"serve.py exited with {self.process.returncode}; see {log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - start > 1800:
                self.stop()
                raise SystemExit(f"serve.py not ready after 30 min; see {log_path}")
            time.sleep(0.5)
        self.startup_s = time.monotonic() - start

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


def graph_compiles(url: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("mindglm:graph_compiles"):
            return float(line.rsplit(" ", 1)[1])
    raise SystemExit(f"{url}/metrics has no mindglm:graph_compiles: is it a mindglm server?")


# ---------------------------------------------------------------------------------- the load
async def one_request(http: httpx.AsyncClient, model: str, prompt: list, output_len: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    stamps, usage, error = [], None, None
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {"ok": False, "error": f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]["message"]
            elif chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    if error or not stamps or usage is None:
        return {"ok": False, "error": error or "no tokens streamed"}
    tokens = usage["completion_tokens"]
    return {"ok": True, "ttft": stamps[0] - start, "latency": end - start, "output_tokens": tokens,
            "prompt_tokens": usage["prompt_tokens"], "itl": list(np.diff(stamps)),
            "tpot": (stamps[-1] - stamps[0]) / (tokens - 1) if tokens > 1 else 0.0}


async def run_load(url: str, model: str, prompts: list, output_len: int, concurrency, rate, seed: int) -> tuple:
    limit = asyncio.Semaphore(concurrency or len(prompts))
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(prompts)) if rate else np.zeros(len(prompts))

    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(3600.0),
                                 limits=httpx.Limits(max_connections=len(prompts) + 4)) as http:
        async def limited(prompt):
            async with limit:
                return await one_request(http, model, prompt, output_len)

        start = time.perf_counter()
        tasks = []
        for prompt, gap in zip(prompts, gaps):
            if gap:
                await asyncio.sleep(float(gap))
            tasks.append(asyncio.ensure_future(limited(prompt)))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def _stats(values, scale=1000.0) -> dict:
    array = np.asarray(values, np.float64) * scale
    if not array.size:
        return {"mean": None, "p50": None, "p99": None}
    return {"mean": float(array.mean()), "p50": float(np.percentile(array, 50)), "p99": float(np.percentile(array, 99))}


def summarize(results: list, duration: float) -> dict:
    done = [r for r in results if r["ok"]]
    output = sum(r["output_tokens"] for r in done)
    prompt = sum(r["prompt_tokens"] for r in done)
    return {"completed": len(done), "failed": len(results) - len(done),
            "errors": sorted({r["error"] for r in results if not r["ok"]})[:3],
            "duration_s": duration, "request_throughput": len(done) / duration,
            "output_throughput": output / duration, "total_token_throughput": (output + prompt) / duration,
            "total_output_tokens": output,
            "ttft_ms": _stats([r["ttft"] for r in done]), "tpot_ms": _stats([r["tpot"] for r in done]),
            "itl_ms": _stats([gap for r in done for gap in r["itl"]]),
            "e2el_ms": _stats([r["latency"] for r in done])}


def solo_probes(url: str, model: str, args, prompts: list) -> dict:
    """Requests alone on the server: TTFT and TPOT of one stream, and the TTFT of a prompt of one
    prefill chunk (`--chunk-size` tokens), the unit of the TTFT target under load."""
    singles = [asyncio.run(run_load(url, model, [prompt], args.output_len, 1, None, args.seed))[0][0]
               for prompt in prompts[:args.solo_requests]]
    chunk_prompt = [int(i) for i in np.random.default_rng(args.seed + 1).integers(100, 60000, args.chunk_size)]
    chunk = asyncio.run(run_load(url, model, [chunk_prompt], 2, 1, None, args.seed))[0][0]
    failed = [r["error"] for r in singles + [chunk] if not r["ok"]]
    if failed:
        raise SystemExit(f"solo requests failed: {failed[:2]}")
    return {"ttft_ms": float(np.median([r["ttft"] for r in singles]) * 1e3),
            "tpot_ms": float(np.median([r["tpot"] for r in singles]) * 1e3),
            "chunk_prefill_ttft_ms": chunk["ttft"] * 1e3, "chunk_size": args.chunk_size,
            "requests": len(singles)}


def bench(url: str, args, prompts: list, solo: bool = True) -> dict:
    model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    # one request first: nothing measured pays for first-use costs
    asyncio.run(run_load(url, model, prompts[:1], 4, 1, None, args.seed))
    compiles = graph_compiles(url)
    report = {"solo": solo_probes(url, model, args, prompts)} if solo else {}
    results, duration = asyncio.run(run_load(url, model, prompts, args.output_len, args.max_concurrency,
                                             args.request_rate, args.seed))
    report.update(summarize(results, duration))
    report["graph_compiles_during_run"] = graph_compiles(url) - compiles  # solo probes included
    return report


def targets(report: dict) -> dict:
    """The issue's targets, computed from this run (None where the run lacks the measurement)."""
    batched = report.get("batched") or report.get("server")
    solo = batched["solo"]
    out = {"p99_ttft_ms": batched["ttft_ms"]["p99"],
           "p99_ttft_bound_ms (2 x single + chunk)": 2 * solo["ttft_ms"] + solo["chunk_prefill_ttft_ms"],
           "graph_compiles_after_warmup": sum(report[k]["graph_compiles_during_run"]
                                              for k in ("batched", "serial", "server") if k in report)}
    out["p99_ttft_within_bound"] = out["p99_ttft_ms"] <= out["p99_ttft_bound_ms (2 x single + chunk)"]
    if "serial" in report:
        ratio = batched["output_throughput"] / report["serial"]["output_throughput"]
        out.update({"batched_over_serial_output_tokens_per_s": ratio, "batched_over_serial_at_least_3.5": ratio >= 3.5})
    if "engine_batch1" in report:
        ratio = solo["tpot_ms"] / report["engine_batch1"]["median_step_ms"]
        out.update({"single_stream_tpot_over_engine_step": ratio, "tpot_within_15_percent": ratio <= 1.15})
    return out


# ---------------------------------------------------------------------------------- engine baseline
def engine_batch1_step_ms(config: str, input_len: int, output_len: int, seed: int) -> dict:
    """Median engine.step() time decoding one sequence, in-process (no HTTP, no server thread)."""
    from mindglm.generation.config import GenerationConfig
    from mindglm.yaml_config import apply_context, load_run_config

    run = load_run_config(config, [("engine.max_num_seqs", 1)])
    apply_context(run.context)
    engine = run.build_model().engine
    engine.warmup()
    prompt = [int(i) for i in np.random.default_rng(seed).integers(100, 60000, input_len)]
    times = []
    for _ in range(2):
        seq = engine.add_request(prompt, GenerationConfig(max_new_tokens=output_len), stop_ids=[])
        engine.step()  # prefill + first token
        while not seq.finished:
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
    return {"median_step_ms": float(np.median(times) * 1e3), "steps": len(times)}


# ---------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    # (bench_generate's `tiny` has a 1000-token vocabulary: too small for the real tokenizer)
    source.add_argument("--model", choices=["small", "mid"], help="bench_generate's random-weight model")
    source.add_argument("--config", help="a YAML run config to serve")
    source.add_argument("--base-url", help="a server already running (no --compare-serial)")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=64, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=64, help="generated tokens per request")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at once")
    load.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second")
    parser.add_argument("--max-num-seqs", type=int, default=8, help="the batched server's --max-num-seqs")
    parser.add_argument("--compare-serial", action="store_true",
                        help="also run the load against the server started with --max-num-seqs 1")
    parser.add_argument("--engine-baseline", action="store_true",
                        help="also time the engine's batch-1 decode step in-process")
    parser.add_argument("--solo-requests", type=int, default=3, help="requests run alone first (TTFT/TPOT of one)")
    parser.add_argument("--chunk-size", type=int, default=256, help="the engine's prefill chunk (engine.chunk_size)")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "mindglm-bench"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.max_concurrency is None and args.request_rate is None:
        args.max_concurrency = args.max_num_seqs
    if args.base_url and (args.compare_serial or args.engine_baseline):
        parser.error("--compare-serial and --engine-baseline start their own servers: use --model or --config")
    for name in ("num_prompts", "input_len", "output_len", "max_num_seqs", "solo_requests", "chunk_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    # ids well inside the ChatGLM2 vocabulary, away from its special tokens
    prompts = [[int(i) for i in rng.integers(100, 60000, args.input_len)] for _ in range(args.num_prompts)]
    report = {"args": {k: v for k, v in vars(args).items() if k != "work_dir"},
              "load_average_start": list(os.getloadavg()), "cpus": os.cpu_count()}
    if args.base_url:
        report["server"] = bench(args.base_url.rstrip("/"), args, prompts)
    else:
        config = args.config or benchmark_model(args.model, args.work_dir, args.seed)
        runs = [("batched", args.max_num_seqs)] + ([("serial", 1)] if args.compare_serial else [])
        for name, rows in runs:
            server = Server(config, rows, os.path.join(args.work_dir, f"serve-{name}.log"))
            try:
                report[name] = bench(server.url, args, prompts, solo=name == "batched")
                report[name]["max_num_seqs"] = rows
                report[name]["server_startup_s"] = server.startup_s
            finally:
                server.stop()
        if args.compare_serial:
            batched, serial = report["batched"], report["serial"]
            report["batched_over_serial"] = {
                key: batched[key] / serial[key] for key in ("output_throughput", "request_throughput")}
            print(f"batched/serial output tokens/s: {report['batched_over_serial']['output_throughput']:.2f}x "
                  f"({batched['output_throughput']:.1f} vs {serial['output_throughput']:.1f})", file=sys.stderr)
        if args.engine_baseline:
            baseline = engine_batch1_step_ms(config, args.input_len, args.output_len, args.seed)
            report["engine_batch1"] = baseline
    report["targets"] = targets(report)
    report["load_average_end"] = list(os.getloadavg())
    text = json.dumps(report, indent=1)
    print(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
