"""The fine-tuning YAML: the base model's run config, the method and its settings, data, training.

    model: ../glm2/chatglm2_6b.yaml     # a run config (checkpoint, tokenizer); relative to this file
    method: lora                        # lora | ptuning
    lora: {r: 8, lora_alpha: 32, lora_dropout: 0.1, target_modules: [query_key_value]}
    ptuning: {pre_seq_len: 128, prefix_dropout: 0.0, prefix_projection: false}
    data: {train_file: train.json, validation_file: dev.json, prompt_column: content, ...}
    train: {output_dir: output/lora, max_steps: 3000, per_device_train_batch_size: 1, ...}

`--set train.max_steps=10` overrides one key (YAML-typed); every key is checked.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterable

import yaml

from mindglm.config import ConfigError
from mindglm.tuning.data import DataConfig
from mindglm.tuning.train import OptimConfig


@dataclasses.dataclass
class LoRASettings:
    r: int = 8
    lora_alpha: float = 32
    lora_dropout: float = 0.0
    target_modules: list = dataclasses.field(default_factory=lambda: ["query_key_value"])


@dataclasses.dataclass
class PTuningSettings:
    pre_seq_len: int = 128
    prefix_dropout: float = 0.0
    prefix_projection: bool = False     # THUDM's 2-layer MLP over the prefix embedding


@dataclasses.dataclass
class TrainSettings(OptimConfig):
    output_dir: str = "output"
    max_steps: int = 100
    per_device_train_batch_size: int = 1
    logging_steps: int = 10
    eval_steps: int = 0          # 0: no evaluation
    save_steps: int = 0          # 0: only at the end
    seed: int = 42


@dataclasses.dataclass
class FinetuneConfig:
    model: str
    method: str
    lora: LoRASettings
    ptuning: PTuningSettings
    data: DataConfig
    train: TrainSettings
    train_file: str
    validation_file: str = None


SECTIONS = {"lora": LoRASettings, "ptuning": PTuningSettings, "train": TrainSettings, "data": DataConfig}
FILE_KEYS = ("train_file", "validation_file")


def _section(cls, values, name, source):
    known = {f.name for f in dataclasses.fields(cls)}
    extra = (set(FILE_KEYS) if name == "data" else set())
    for key in values:
        if key not in known | extra:
            raise ConfigError(f"{source}: unknown key '{name}.{key}'; known: {', '.join(sorted(known | extra))}")
    fields = {k: v for k, v in values.items() if k in known}
    for f in dataclasses.fields(cls):
        if f.name not in fields:
            continue
        value = fields[f.name]
        if isinstance(f.default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{source}: key '{name}.{f.name}' must be true or false, got {value!r}")
        if isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"{source}: key '{name}.{f.name}' must be a number, got {value!r}")
    return cls(**fields)


def load_finetune_config(path: str, overrides: Iterable[str] = ()) -> FinetuneConfig:
    """Read and check a fine-tuning YAML; paths are relative to its directory."""
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read fine-tuning config {path}: {exc}") from None
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) > 2 or (len(parts) == 2 and parts[0] not in SECTIONS):
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE with SECTION one of {', '.join(SECTIONS)}")
        node = raw.setdefault(parts[0], {}) if len(parts) == 2 else raw
        node[parts[-1]] = yaml.safe_load(text)
    base = os.path.dirname(os.path.abspath(path))
    for key in set(raw) - {"model", "method", *SECTIONS}:
        raise ConfigError(f"{path}: unknown key '{key}'; known: model, method, {', '.join(SECTIONS)}")
    if not isinstance(raw.get("model"), str):
        raise ConfigError(f"{path}: 'model' must name the base model's run config (a YAML under configs/)")
    method = raw.get("method")
    if method not in ("lora", "ptuning"):
        raise ConfigError(f"{path}: 'method' must be lora or ptuning, got {method!r}")
    sections = {name: _section(cls, raw.get(name) or {}, name, path) for name, cls in SECTIONS.items()}
    data = raw.get("data") or {}
    if not data.get("train_file"):
        raise ConfigError(f"{path}: 'data.train_file' is required (JSON lines)")

    def resolve(p):
        return None if p is None else os.path.join(base, os.path.expanduser(p))
    for key, value in (("lora.lora_dropout", sections["lora"].lora_dropout),
                       ("ptuning.prefix_dropout", sections["ptuning"].prefix_dropout)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{path}: '{key}' is a dropout probability in [0, 1), got {value}")
    train = sections["train"]
    if train.loss_scale_value and not (train.loss_scale_value >= 1 and isinstance(train.loss_scale_factor, int)
                                       and train.loss_scale_factor >= 2 and isinstance(train.loss_scale_window, int)
                                       and train.loss_scale_window >= 1):
        raise ConfigError(f"{path}: loss scaling needs train.loss_scale_value >= 1 (or 0: off), an integer "
                          f"loss_scale_factor >= 2 and an integer loss_scale_window >= 1; got "
                          f"{train.loss_scale_value}, {train.loss_scale_factor}, {train.loss_scale_window}")
    train.output_dir = resolve(train.output_dir)
    return FinetuneConfig(model=resolve(raw["model"]), method=method, train_file=resolve(data["train_file"]),
                          validation_file=resolve(data.get("validation_file")), **sections)
