"""Fine-tune a GLM model with LoRA or P-Tuning v2 on JSON-lines data.

    python tools/finetune.py --config configs/glm2/finetune_lora.yaml [--set train.max_steps=10]
    python tools/finetune.py --config ... --resume            # continue from the last checkpoint
    python tools/finetune.py --config ... --merge OUT.ckpt --adapter DIR [--to-hf]
    msrun --worker_num=N --local_worker_num=N --master_port=8118 --join=True tools/finetune.py --config ...

Checkpoints `output_dir/checkpoint-N/` hold the adapter (LoRA: peft's format; P-Tuning: THUDM's),
loadable with `--adapter`, plus `trainer_state.npz` (optimizer moments, step, loss scale):
`--resume` continues exactly. Ctrl-C saves a checkpoint after the current step and exits.
The data order is a function of (seed, epoch) only, so the step number is the data position,
and dropout masks are drawn from (seed, step, micro-batch): a resumed run equals an uninterrupted one.

Under msrun the N workers train one model data-parallel: a step takes per_device_train_batch_size
x gradient_accumulation_steps x N examples, each rank runs its N-th of the micro-batches, and the
gradients are all-reduced before the update — the step one process takes with
gradient_accumulation_steps x N (the same examples, the same mean of micro-batch means), so the
loss curve and the adapter are the same. Rank 0 logs, evaluates and writes the checkpoints.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import signal
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mindglm.config import ConfigError  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="fine-tuning YAML (configs/<family>/finetune_*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--resume", action="store_true", help="continue from output_dir's last checkpoint")
    parser.add_argument("--merge", metavar="OUT", help="write base + --adapter merged to OUT (.ckpt, or a THUDM "
                                                      "dir with --to-hf) instead of training")
    parser.add_argument("--adapter", metavar="DIR", help="the LoRA adapter to merge (with --merge)")
    parser.add_argument("--to-hf", action="store_true", help="with --merge: THUDM format (config.json + .bin)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------- pieces
def build(cfg):
    """(model, tokenizer, run config, prefix encoder or None, DataParallel or None) with a fresh
    adapter added; under an msrun launch of 2+ workers this process joins it as a data-parallel rank."""
    from mindglm.adapters.lora import add_lora
    from mindglm.adapters.prefix import add_prefix
    from mindglm.parallel.context import init_data_parallel
    from mindglm.pipeline import load_run_model
    from mindglm.tuning.train import DataParallel
    from mindglm.yaml_config import load_run_config
    run = load_run_config(cfg.model)
    if run.adapter:
        raise ConfigError(f"{cfg.model}: the base model's run config has an adapter; train on the plain base")
    if run.parallel.tensor_parallel > 1:
        raise ConfigError(f"{cfg.model}: parallel.tensor_parallel is {run.parallel.tensor_parallel}; fine-tuning "
                          "splits the data, not the model: set it to 1 and launch the workers with msrun")
    context = init_data_parallel(run.parallel.start_timeout)   # msrun's scheduler process stops here
    model = load_run_model(run)
    encoder = None
    if cfg.method == "lora":
        lora = cfg.lora
        add_lora(model.network, model.config, lora.target_modules, lora.r, lora.lora_alpha, lora.lora_dropout,
                 seed=cfg.train.seed)
    else:
        encoder = add_prefix(model.network, model.config, cfg.ptuning.pre_seq_len, seed=cfg.train.seed,
                             dropout=cfg.ptuning.prefix_dropout, projection=cfg.ptuning.prefix_projection)
    return model, run.load_tokenizer(), run, encoder, context and DataParallel(context.rank, context.world)


def batches_for_step(examples, step: int, batch_size: int, accumulation: int, seed: int) -> list:
    """The micro-batches of optimizer step `step`: epochs of a (seed, epoch)-seeded permutation."""
    per_step = batch_size * accumulation
    out = []
    for k in range(per_step):
        index = step * per_step + k
        epoch, position = divmod(index, len(examples))
        order = np.random.default_rng(seed + epoch).permutation(len(examples))
        out.append(examples[order[position]])
    return [out[i:i + batch_size] for i in range(0, per_step, batch_size)]


def save_checkpoint(cfg, model, trainer, base_config_json: dict) -> str:
    """output_dir/checkpoint-N: the adapter in its interchange format + trainer_state.npz."""
    from mindglm.adapters.lora import LoRAConfig
    from mindglm.adapters.save import atomic_dir, save_lora, save_ptuning
    path = os.path.join(cfg.train.output_dir, f"checkpoint-{trainer.step}")
    with atomic_dir(path) as tmp:
        adapter = os.path.join(tmp, "adapter")
        if cfg.method == "lora":
            save_lora(model.network, model.config, adapter,
                      LoRAConfig(cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.target_modules, cfg.lora.lora_dropout))
        else:
            save_ptuning(trainer.encoder, adapter, base_config_json)
        np.savez(os.path.join(tmp, "trainer_state.npz"), **trainer.state())
    return path


def latest_checkpoint(output_dir: str):
    found = [(int(p.rsplit("-", 1)[1]), p) for p in glob.glob(os.path.join(output_dir, "checkpoint-*"))
             if p.rsplit("-", 1)[1].isdigit()]
    return max(found)[1] if found else None


def restore(path: str, model, trainer, method: str) -> None:
    """Adapter values and trainer state of checkpoint `path` back into a fresh model and trainer."""
    from mindspore import Tensor, ops
    from mindglm.adapters.lora import LoRALinear, read_lora_pairs
    from mindglm.adapters.ptuning import prefix_encoder_from
    from mindglm.adapters.prefix import write_prefixes
    adapter = os.path.join(path, "adapter")
    if method == "lora":
        cells = {p: c for p, c in model.network.cells_and_names() if isinstance(c, LoRALinear)}
        saved = {f"{target}.{ab}": array for target, pair in read_lora_pairs(adapter, model.config).items()
                 for ab, array in zip(("lora_a", "lora_b"), pair)}
        params = {f"{target}.{ab}": getattr(cell, ab) for target, cell in cells.items() for ab in ("lora_a", "lora_b")}
    else:
        saved = {n: p.asnumpy() for n, p in prefix_encoder_from(adapter, model.config).parameters_and_names()}
        params = dict(trainer.encoder.parameters_and_names())
    misfits = sorted(set(saved) ^ set(params)) or [n for n in params if saved[n].shape != tuple(params[n].shape)]
    if misfits:
        raise ConfigError(f"--resume: {adapter} does not fit this run's {method} settings ('{misfits[0]}' is "
                          "missing or shaped otherwise); resume with the settings the checkpoint was trained with")
    for name, param in params.items():
        ops.assign(param, Tensor(saved[name], param.dtype))
    if method != "lora":
        write_prefixes(model.network, trainer.encoder)
    with np.load(os.path.join(path, "trainer_state.npz")) as state:
        trainer.load_state(state)


def merge(args, cfg) -> int:
    """Write the base model with a LoRA adapter merged in."""
    import mindspore as ms
    from mindglm.adapters import adapter_kind
    from mindglm.adapters.save import atomic_dir
    from mindglm.loading import weight_slots
    from mindglm.pipeline import load_run_model
    from mindglm.yaml_config import load_run_config
    if not args.adapter:
        raise ConfigError("--merge needs --adapter DIR (a LoRA checkpoint's adapter/ dir)")
    if adapter_kind(args.adapter) != "lora":
        raise ConfigError(f"{args.adapter}: only LoRA merges into the weights; a P-Tuning prefix stays an adapter")
    run = load_run_config(cfg.model, [("adapter", os.path.abspath(args.adapter))])
    model = load_run_model(run)
    if args.to_hf:
        from mindglm.checkpoint import to_thudm
        from mindglm.io.torch_bin import save_torch_bin
        base_json = os.path.join(run.checkpoint if os.path.isdir(run.checkpoint) else os.path.dirname(run.checkpoint),
                                 "config.json")
        with atomic_dir(args.merge) as tmp:
            tensors = (pair for name, (_, _, p) in weight_slots(model.network).items()
                       for pair in to_thudm(name, p.asnumpy(), model.config))
            save_torch_bin(os.path.join(tmp, "pytorch_model.bin"), tensors)
            with open(base_json, encoding="utf-8") as src, open(os.path.join(tmp, "config.json"), "w") as dst:
                dst.write(src.read())
    else:
        if not args.merge.endswith(".ckpt"):
            raise ConfigError(f"--merge {args.merge}: name the merged checkpoint *.ckpt (or pass --to-hf for a dir)")
        tmp = args.merge[: -len(".ckpt")] + ".tmp.ckpt"   # MindSpore appends .ckpt to any other name
        params = [{"name": n, "data": p} for n, (_, _, p) in sorted(weight_slots(model.network).items())]
        ms.save_checkpoint(params, tmp)
        os.replace(tmp, args.merge)
    print(f"merged {args.adapter} into {args.merge}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------- training
def train(args, cfg) -> int:
    from mindglm.interrupts import InterruptFlag
    from mindglm.tuning.data import read_examples
    from mindglm.tuning.train import Trainer, collate
    model, tokenizer, run, encoder, data_parallel = build(cfg)
    world = 1 if data_parallel is None else data_parallel.world
    lead = data_parallel is None or data_parallel.is_lead
    family = model.config.family
    examples = read_examples(cfg.train_file, tokenizer, family, cfg.data)
    validation = read_examples(cfg.validation_file, tokenizer, family, cfg.data) if cfg.validation_file else []
    t = cfg.train
    trainer = Trainer(model.network, model.config, t, t.max_steps, prefix_encoder=encoder, seed=t.seed,
                      data_parallel=data_parallel)
    base_dir = run.checkpoint if os.path.isdir(run.checkpoint) else os.path.dirname(run.checkpoint)
    base_json_path = os.path.join(base_dir, "config.json")
    base_json = json.load(open(base_json_path)) if os.path.isfile(base_json_path) else {}
    os.makedirs(t.output_dir, exist_ok=True)
    log_path = os.path.join(t.output_dir, "train_log.jsonl")
    if args.resume:
        last = latest_checkpoint(t.output_dir)
        if last is None:
            raise ConfigError(f"--resume: no checkpoint-N in {t.output_dir}")
        restore(last, model, trainer, cfg.method)
        if lead:
            print(f"resumed from {last} at step {trainer.step}", file=sys.stderr)
    # Pad every batch to one length: one compiled graph for the whole run.
    pad_to = max(len(e.input_ids) for e in examples + validation)
    flag = InterruptFlag("\ninterrupt: saving a checkpoint after this step (again to abort)\n")
    previous = signal.signal(signal.SIGINT, flag)
    started, tokens, stop = time.time(), 0, False
    try:
        with open(log_path, "a", encoding="utf-8") if lead else contextlib.nullcontext() as log:
            while trainer.step < t.max_steps and not stop:
                batches = batches_for_step(examples, trainer.step, t.per_device_train_batch_size,
                                           t.gradient_accumulation_steps * world, t.seed)
                if data_parallel is not None:
                    batches = data_parallel.share(batches)
                result = trainer.train_step([collate(b, model.config, pad_to) for b in batches], lambda: flag.requested)
                tokens, stop = tokens + result["tokens"], result["stop"]
                if not lead:
                    continue
                record = {"step": trainer.step, "loss": result["loss"], "lr": result["lr"]}
                if t.eval_steps and validation and trainer.step % t.eval_steps == 0:
                    record["eval_loss"] = trainer.evaluate([collate([e], model.config, pad_to) for e in validation])
                log.write(json.dumps(record) + "\n")
                log.flush()
                rate = tokens / max(time.time() - started, 1e-9)
                sys.stderr.write(f"\r[{trainer.step}/{t.max_steps}] loss {result['loss']:.4f} lr {result['lr']:.2e} "
                                 f"{rate:.0f} tok/s" + (f" eval {record['eval_loss']:.4f}" if "eval_loss" in record
                                                        else ""))
                if t.save_steps and trainer.step % t.save_steps == 0 and trainer.step < t.max_steps:
                    save_checkpoint(cfg, model, trainer, base_json)
    finally:
        signal.signal(signal.SIGINT, previous)
    if lead:
        path = save_checkpoint(cfg, model, trainer, base_json)
        print(f"\nsaved {path}" + (" (interrupted)" if stop else ""), file=sys.stderr)
    return 130 if stop else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from mindglm.checkpoint import CheckpointError
    from mindglm.tuning.config import load_finetune_config
    try:
        cfg = load_finetune_config(args.config, args.overrides)
        return merge(args, cfg) if args.merge else train(args, cfg)
    except (ConfigError, CheckpointError) as exc:
        print(f"finetune.py: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
