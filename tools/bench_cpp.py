"""Same-run decode speed of mindglm's weight formats against chatglm.cpp's (batch 1).

Both engines get the same random ChatGLM2-shaped weights (tools/bench_generate.py's
`random_weights`): mindglm builds its network with each weight format (fp32 and fp16 through the
CPU kernels, THUDM's per-row int8 / int4), chatglm.cpp gets GGML files written by its own
converter code (`chatglm_cpp.convert`, which needs torch) at f32 / f16 / q8_0 / q4_0. Runs
alternate between the engines, so a busy spell on a shared machine hits both. For mindglm each
decode step is split into the time inside mindglm's kernels and the rest (MindSpore's own ops,
graph launch, host work). Run through `python tools/bench_generate.py --compare-cpp`.
"""
from __future__ import annotations

import dataclasses
import os
import struct  # noqa: F401  (chatglm_cpp.convert writes with it)
import tempfile
import time
from types import SimpleNamespace

import numpy as np

# mindglm format -> (GLMConfig changes, chatglm.cpp type at the same precision)
PAIRS = {
    "fp32": ({"linear_backend": "kernels"}, "f32"),
    "fp16": ({"weight_dtype": "float16"}, "f16"),
    # chatglm.cpp's q8_0 / q4_0 quantize the output layer too: so does mindglm here (THUDM does not)
    "int8": ({"quantization_bit": 8, "quantize_output": True}, "q8_0"),
    "int4": ({"quantization_bit": 4, "quantize_output": True}, "q4_0"),
    "int8-thudm": ({"quantization_bit": 8}, "q8_0"),  # THUDM's layout: fp32 output layer
    "matmul": ({}, "f32"),  # MindSpore's own MatMul on fp32 weights, for reference
}


def thudm_config(config):
    """The attributes of THUDM's ChatGLM2 config that chatglm.cpp's converter reads."""
    return SimpleNamespace(
        add_bias_linear=False, add_qkv_bias=True, apply_residual_connection_post_layernorm=False,
        kv_channels=config.kv_channels, num_attention_heads=config.num_attention_heads,
        hidden_size=config.hidden_size, multi_query_attention=True, original_rope=True, post_layer_norm=True,
        rmsnorm=True, padded_vocab_size=config.vocab_size, multi_query_group_num=config.multi_query_group_num,
        num_layers=config.num_layers, ffn_hidden_size=config.ffn_hidden_size,
        layernorm_epsilon=config.layernorm_epsilon, pre_seq_len=None, rope_ratio=1, seq_length=config.seq_length,
        eos_token_id=config.eos_token_ids[0] if config.eos_token_ids else -1, pad_token_id=config.pad_id)


def thudm_state(weights: dict) -> dict:
    """THUDM-named torch tensors of mindglm-named ChatGLM2 arrays."""
    import torch
    from mindglm.checkpoint import to_thudm

    state = {}
    for name, array in weights.items():
        for thudm, out in to_thudm(name, array, family="chatglm2"):
            state[thudm] = torch.from_numpy(np.ascontiguousarray(out))
    return state


def write_ggml(path: str, config, state, ggml_type: str, tokenizer_model: str) -> None:
    """A chatglm.cpp model file written by chatglm.cpp's own converter from `state`, a mapping of
    THUDM names to torch tensors (its converter reads them one at a time, so the mapping may
    load lazily)."""
    from chatglm_cpp import convert as cpp_convert
    import sentencepiece

    model = SimpleNamespace(config=thudm_config(config), state_dict=lambda: state)
    sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer_model)
    tokenizer = SimpleNamespace(tokenizer=SimpleNamespace(sp_model=sp))
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        cpp_convert.ChatGLM2Converter.convert(fh, model, tokenizer, cpp_convert.GGMLType[ggml_type.upper()])
    os.replace(tmp, path)


class CppEngine:
    """chatglm.cpp's greedy decode loop, one timestamp per token (its Pipeline's own loop)."""

    def __init__(self, path: str, max_length: int):
        import chatglm_cpp
        self.pipeline = chatglm_cpp.Pipeline(path, max_length=max_length)
        self.max_length = max_length

    def generate(self, prompt: np.ndarray, new_tokens: int):
        import chatglm_cpp
        config = chatglm_cpp._C.GenerationConfig(max_length=self.max_length, max_new_tokens=new_tokens,
                                                 max_context_length=self.max_length, do_sample=False)
        model, ids = self.pipeline.model, [int(t) for t in prompt[0]]
        n_past, n_ctx, stamps = 0, len(ids), []
        for _ in range(new_tokens):
            token = model.generate_next_token(ids, None, config, n_past, n_ctx)
            stamps.append(time.perf_counter())
            n_past = model.count_tokens(ids, None)
            ids.append(token)
        return np.asarray([ids]), stamps, None


class MindglmEngine:
    def __init__(self, model):
        self.model = model
        self.head_exact = self.head_logits = 0

    def generate(self, prompt: np.ndarray, new_tokens: int):
        """(tokens, stamps, kernel seconds per decode step)."""
        from mindglm.generation.streamers import Streamer
        from mindglm.kernels.build import head_counters, kernel_counters

        class Stamps(Streamer):
            def __init__(self):
                self.stamps = []

            def put(self, tokens):
                if not self.stamps:
                    kernel_counters(reset=True)  # after prefill: count decode steps only
                    head_counters(reset=True)
                self.stamps.append(time.perf_counter())

            def end(self):
                pass

        streamer = Stamps()
        tokens = self.model.generate(prompt, max_new_tokens=new_tokens, eos_token_id=-1, streamer=streamer)
        kernel_s, _ = kernel_counters(reset=True)
        self.head_exact, self.head_logits = head_counters(reset=True)
        return tokens, streamer.stamps, kernel_s / max(len(streamer.stamps) - 1, 1)


def build_mindglm(config, weights: dict, fmt: str, decode_steps: int = 1):
    from mindglm.engine import EngineConfig
    from mindglm.loading import load_weights
    from mindglm.models import family_module
    from mindglm.pipeline import GLMModel
    from mindglm.quantize import quantize_network

    config = dataclasses.replace(config, **PAIRS[fmt][0])
    network = family_module(config).build_network(config)
    quantize_network(network, config)
    load_weights(network, weights.items(), "random")
    return GLMModel(config, network, engine_config=EngineConfig(decode_steps=decode_steps))


def compare(config, weights: dict, formats: list, prompt: np.ndarray, new_tokens: int, repeats: int,
            tokenizer_model: str, load_average, decode_steps: int = 1) -> dict:
    """{format: {mindglm, chatglm_cpp, ratio, breakdown}} for each mindglm format and its peer.

    Rates are per run (decode tokens / their seconds): with decode_steps > 1 mindglm's tokens come
    in bursts, so single step times mean nothing there. `ratio` compares the best runs,
    `ratio_median_run` the median runs, `ratio_paired` the median of each round's own ratio."""
    report = {}
    with tempfile.TemporaryDirectory(prefix="bench_cpp_") as tmp:
        for fmt in formats:
            cpp_type = PAIRS[fmt][1]
            path = os.path.join(tmp, f"{cpp_type}.bin")
            if not os.path.exists(path):
                write_ggml(path, config, thudm_state(weights), cpp_type, tokenizer_model)
            engines = {"mindglm": MindglmEngine(build_mindglm(config, weights, fmt, decode_steps)),
                       "chatglm_cpp": CppEngine(path, prompt.shape[1] + new_tokens + 8)}
            # Warm-up as long as a timed run: the decode graph of every key window the runs reach
            # is compiled here, not inside the first timed run (a 1.2 s step in it otherwise).
            for engine in engines.values():
                engine.generate(prompt, new_tokens)
            steps = {name: [] for name in engines}
            kernel = []
            for _ in range(repeats):
                for name, engine in engines.items():
                    _, stamps, kernel_step = engine.generate(prompt, new_tokens)
                    steps[name].append(np.diff(np.asarray(stamps)))
                    if kernel_step is not None:
                        kernel.append(kernel_step)
            entry = {"chatglm_cpp_type": cpp_type, "load_average": load_average()}
            for name, runs in steps.items():
                per_run = [len(s) / float(s.sum()) for s in runs]
                entry[name] = {"decode_tokens_per_s": max(per_run), "runs_tokens_per_s": per_run,
                               "median_run_tokens_per_s": float(np.median(per_run))}
            mg, cpp = entry["mindglm"], entry["chatglm_cpp"]
            entry["ratio"] = mg["decode_tokens_per_s"] / cpp["decode_tokens_per_s"]
            entry["ratio_median_run"] = mg["median_run_tokens_per_s"] / cpp["median_run_tokens_per_s"]
            entry["ratio_paired"] = float(np.median(np.divide(mg["runs_tokens_per_s"], cpp["runs_tokens_per_s"])))
            token_ms = 1e3 / mg["median_run_tokens_per_s"]
            kernel_ms = float(np.median(kernel)) * 1e3 if kernel else 0.0
            entry["mindglm_breakdown_ms"] = {"token": token_ms, "kernels": kernel_ms, "rest": token_ms - kernel_ms}
            head = engines["mindglm"]
            if head.head_logits:   # a float32 head's greedy steps (decode_steps > 1): logits computed exactly
                entry["mindglm_head_exact_per_step"] = head.head_exact / (head.head_logits / config.vocab_size)
            report[fmt] = entry
            print(f"{fmt}: mindglm {mg['decode_tokens_per_s']:.1f} tok/s, chatglm.cpp {cpp_type} "
                  f"{cpp['decode_tokens_per_s']:.1f} tok/s, ratio {entry['ratio']:.2f} "
                  f"(paired {entry['ratio_paired']:.2f}; kernels {kernel_ms:.1f} of {token_ms:.1f} ms/token; "
                  f"load {entry['load_average']})",
                  flush=True)
            del engines
    return report
