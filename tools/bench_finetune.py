"""Training throughput and peak memory: mindglm LoRA / P-Tuning v2 against torch (+ peft for LoRA).

    python tools/bench_finetune.py --config small [--steps 5 --seq 128 --batch 1 --rounds 3]

Same random weights (tools/bench_generate.py), same tokens; LoRA r=8 on the attention output,
the fused gate/up and the down projection (GlmForCausalLM splits qkv, so qkv is left out on both
sides); P-Tuning: pre_seq_len 16, without and with THUDM's projection MLP; torch runs THUDM's
PrefixEncoder + get_prompt() past keys/values on GlmForCausalLM (as tests/test_oracle_ptuning.py
checks it against the wave2 goldens). Each variant runs in its own process, so its peak RSS is its own.
Prints one JSON object: tokens/s (after one warm-up step; the median over the interleaved rounds)
and peak RSS MiB per variant.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

import numpy as np  # noqa: E402

TARGETS = ["dense", "dense_h_to_4h", "dense_4h_to_h"]


def _tokens(config, args):
    rng = np.random.default_rng(0)
    return rng.integers(5, config.vocab_size - 10, (args.batch, args.seq))


def run_mindglm(method, config_name, args, queue):
    from bench_generate import CONFIGS, build_mindglm, peak_rss_mb, random_weights
    from mindglm.adapters.lora import add_lora
    from mindglm.adapters.prefix import add_prefix
    from mindglm.config import GLMConfig
    from mindglm.tuning.data import Example
    from mindglm.tuning.train import OptimConfig, Trainer, collate
    config = GLMConfig(family="chatglm2", pad_token_id=0, **CONFIGS[config_name])
    model = build_mindglm(config, random_weights(config, 0))
    network = getattr(model, "network", model)
    encoder = None
    if method == "lora":
        add_lora(network, config, TARGETS, 8, 16)
    else:   # as tools/finetune.py trains it: the prefix encoder, through its output
        encoder = add_prefix(network, config, 16, projection=method == "ptuning-projection")
    ids = _tokens(config, args)
    batch = collate([Example(list(row), [-100] + list(row[1:]), 1) for row in ids], config)
    trainer = Trainer(network, config, OptimConfig(learning_rate=1e-4), args.steps + 1, prefix_encoder=encoder)
    trainer.train_step([batch])                      # compile
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step([batch])
    seconds = time.perf_counter() - start
    queue.put({"tokens_per_s": args.steps * ids.size / seconds,
               "peak_rss_mib": peak_rss_mb()})


def run_torch(method, config_name, args, queue):
    import peft
    import torch
    from bench_generate import CONFIGS, build_torch, peak_rss_mb, random_weights
    from mindglm.config import GLMConfig
    config = GLMConfig(family="chatglm2", pad_token_id=0, **CONFIGS[config_name])
    model = build_torch(config, random_weights(config, 0))
    ids = torch.from_numpy(_tokens(config, args))
    if method == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=[
            "o_proj", "gate_up_proj", "down_proj"]))
        trained = [p for p in model.parameters() if p.requires_grad]

        def loss():
            return model(input_ids=ids, labels=ids).loss
    else:
        loss, trained = _torch_ptuning_loss(model, config, ids, projection=method == "ptuning-projection")
    model.train()
    optimizer = torch.optim.AdamW(trained, lr=1e-4)

    def step():
        loss().backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad()
    step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - start
    queue.put({"tokens_per_s": args.steps * ids.numel() / seconds,
               "peak_rss_mib": peak_rss_mb()})


def _torch_ptuning_loss(model, config, ids, projection: bool, prefix: int = 16):
    """(loss function, trained parameters) of THUDM's P-Tuning v2 over GlmForCausalLM: a frozen
    model, THUDM's PrefixEncoder (embedding, optionally -> Linear -> tanh -> Linear) whose output
    get_prompt() turns into every layer's past keys/values; positions from 0."""
    import torch
    import transformers
    for param in model.parameters():
        param.requires_grad_(False)
    kv_size = config.num_layers * 2 * config.multi_query_group_num * config.kv_channels
    layers = [torch.nn.Embedding(prefix, kv_size)]
    if projection:
        layers += [torch.nn.Linear(kv_size, config.hidden_size), torch.nn.Tanh(),
                   torch.nn.Linear(config.hidden_size, kv_size)]
    encoder = torch.nn.Sequential(*layers)
    batch, length = ids.shape

    def loss():
        past = encoder(torch.arange(prefix)).view(prefix, config.num_layers * 2, config.multi_query_group_num,
                                                  config.kv_channels)
        cache = transformers.DynamicCache(config=model.config)
        for layer in range(config.num_layers):
            keys, values = (past[:, 2 * layer + j].permute(1, 0, 2)[None].expand(batch, -1, -1, -1) for j in (0, 1))
            cache.update(keys, values, layer)
        return model(input_ids=ids, labels=ids, cache=cache, position_ids=torch.arange(length)[None].expand(batch, -1),
                     attention_mask=torch.ones(batch, prefix + length, dtype=torch.long)).loss
    return loss, list(encoder.parameters())


def measure(target, *arguments):
    queue = multiprocessing.get_context("spawn").Queue()
    process = multiprocessing.get_context("spawn").Process(target=target, args=(*arguments, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", choices=["tiny", "small", "mid"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--no-torch", action="store_true", help="skip the torch + peft reference")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every variant this many times, interleaved; medians are reported")
    args = parser.parse_args(argv)
    from bench_generate import load_average
    report = {"config": args.config, "seq": args.seq, "batch": args.batch, "steps": args.steps,
              "rounds": args.rounds, "load_average_start": load_average()}
    methods = ("lora", "ptuning", "ptuning_projection")
    engines = [("mindglm", run_mindglm)] + ([] if args.no_torch else [("torch", run_torch)])
    runs = {}   # "mindglm_lora" -> [one result per round], ...
    for _ in range(args.rounds):   # the machine is shared: alternate the engines round by round
        for method in methods:
            for engine, target in engines:
                runs.setdefault(f"{engine}_{method}", []).append(
                    measure(target, method.replace("_", "-"), args.config, args))
    for name, results in runs.items():
        report[name] = {"tokens_per_s": float(np.median([r["tokens_per_s"] for r in results])),
                        "peak_rss_mib": max(r["peak_rss_mib"] for r in results),
                        "rounds_tokens_per_s": [r["tokens_per_s"] for r in results]}
    if not args.no_torch:
        for method in methods:
            report[f"{method}_speed_ratio"] = (report[f"mindglm_{method}"]["tokens_per_s"]
                                               / report[f"torch_{method}"]["tokens_per_s"])
    report["load_average_end"] = load_average()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
