"""LoRA adapters in peft's format: merged into the base weights at load, or kept beside them.

A peft LoRA dir holds adapter_config.json (r, lora_alpha, target_modules, ...) and
adapter_model.safetensors / .bin with, per adapted Linear, `base_model.model.<THUDM module>.lora_A.weight`
[r, in] and `.lora_B.weight` [out, r]; the layer computes W x + (B A x) * scaling, scaling =
lora_alpha / r (alpha / sqrt(r) with use_rslora). The THUDM module names map onto mindglm's
Linear cells through the checkpoint name map; ChatGLM-6B's fused qkv rows are regrouped from its
per-head interleave at conversion, and B's rows (the qkv output rows) move with them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from mindglm.adapters.dropout import MaskedDropout
from mindglm.checkpoint import CheckpointError, map_name, qkv_v1_to_grouped, thudm_name
from mindglm.config import ConfigError
from mindglm.io.sources import list_tensors
from mindglm.io.tensors import to_numpy
from mindglm.models.layers import Linear
from mindglm.rewrite import replace_cell

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_NAME = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(\.[A-Za-z0-9_-]+)?\.weight")


@dataclasses.dataclass
class LoRAConfig:
    """What mindglm reads of peft's LoraConfig."""

    r: int
    lora_alpha: float
    target_modules: list
    lora_dropout: float = 0.0
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def read_lora_config(path: str) -> LoRAConfig:
    """adapter_config.json of a peft LoRA dir; settings mindglm cannot honour are refused by name."""
    source = os.path.join(path, CONFIG_FILE)
    try:
        with open(source, encoding="utf-8") as fh:
            raw = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read it as JSON ({exc}); re-save the adapter with peft") from None
    if str(raw.get("peft_type", "LORA")).upper() != "LORA":
        raise ConfigError(f"{source}: peft_type {raw.get('peft_type')!r}; only LoRA adapters load here "
                          "(P-Tuning v2: pass THUDM's checkpoint dir with config.json + pre_seq_len)")
    refused = [("use_dora", raw.get("use_dora")), ("rank_pattern", raw.get("rank_pattern")),
               ("alpha_pattern", raw.get("alpha_pattern")), ("modules_to_save", raw.get("modules_to_save")),
               ("fan_in_fan_out", raw.get("fan_in_fan_out")),
               ("bias", raw.get("bias") not in (None, "none") and raw.get("bias"))]
    for key, value in refused:
        if value:
            raise ConfigError(f"{source}: {key}={value!r} is not supported: train the adapter with plain LoRA "
                              f"({key} unset)")
    try:
        r, alpha = int(raw["r"]), float(raw["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{source} needs integer 'r' and numeric 'lora_alpha' (peft's LoraConfig)") from None
    targets = raw.get("target_modules") or []
    return LoRAConfig(r, alpha, [targets] if isinstance(targets, str) else list(targets),
                      float(raw.get("lora_dropout") or 0.0), bool(raw.get("use_rslora")))


class LoRALinear(nn.Cell):
    """y = base(x) + dropout(x) A^T B^T * scaling, in float32 beside any Linear (float or quantized)."""

    parameter_group = "adapter"  # not base weights: mindglm/loading.py leaves lora_a / lora_b alone

    def __init__(self, base, rank: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scaling = scaling
        self.lora_a = Parameter(np.zeros((rank, self.in_features), np.float32), name="lora_a", requires_grad=False)
        self.lora_b = Parameter(np.zeros((self.out_features, rank), np.float32), name="lora_b", requires_grad=False)
        # masks over [batch, tokens, in]: drawn by the trainer from (seed, step), so a resume repeats them
        self.dropout = MaskedDropout(dropout, (self.in_features,), leading=2) if dropout else None
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        y = self.base(x)
        h = x.astype(ms.float32)
        if self.dropout is not None:
            h = self.dropout(h)
        h = h.reshape(-1, self.in_features)
        delta = self.matmul(self.matmul(h, self.lora_a), self.lora_b) * self.scaling
        return y + delta.reshape(x.shape[:-1] + (self.out_features,)).astype(y.dtype)


def _adapter_file(path: str) -> str:
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise ConfigError(f"{path} has {CONFIG_FILE} but no {' or '.join(WEIGHT_FILES)}: copy the adapter's weights "
                      "next to its config")


def read_lora_pairs(path: str, config) -> dict:
    """{mindglm Linear path: (A [r, in], B [out, r])} of a peft dir, B rows in mindglm's qkv order."""
    weights = _adapter_file(path)
    halves = {}
    for tensor in list_tensors(weights):
        match = _PEFT_NAME.fullmatch(tensor.name)
        if match is None:
            raise ConfigError(f"{weights}: tensor '{tensor.name}' is not a LoRA A/B matrix "
                              "(base_model.model.<module>.lora_A/lora_B.weight): only plain LoRA adapters load")
        module = match.group("module")
        try:
            piece = map_name(module + ".weight", config.family, "thudm")
        except CheckpointError:
            raise ConfigError(f"{weights}: '{tensor.name}' adapts '{module}', which a {config.family} model does "
                              "not have: the adapter was trained for another model family") from None
        if not piece.target.endswith(".weight") or piece.kind not in ("copy", "qkv_v1"):
            raise ConfigError(f"{weights}: '{module}' is not a Linear layer mindglm can adapt")
        array = to_numpy(tensor.load()).astype(np.float32)
        if match.group("ab") == "B" and piece.kind == "qkv_v1":
            array = qkv_v1_to_grouped(array, config.num_attention_heads, config.kv_channels)
        halves.setdefault(piece.target[: -len(".weight")], {})[match.group("ab")] = (array, tensor.name)
    if not halves:
        raise ConfigError(f"{weights} holds no LoRA tensors")
    pairs = {}
    for target, parts in halves.items():
        if set(parts) != {"A", "B"}:
            have = next(iter(parts.values()))[1]
            raise ConfigError(f"{weights}: '{have}' has no lora_{'B' if 'A' in parts else 'A'} partner: "
                              "the adapter file is incomplete")
        pairs[target] = (parts["A"][0], parts["B"][0])
    return pairs


def _check_pair(path: str, target: str, cell, a: np.ndarray, b: np.ndarray, rank: int) -> None:
    want_a, want_b = (rank, cell.in_features), (cell.out_features, rank)
    if a.shape != want_a or b.shape != want_b:
        raise ConfigError(f"{path}: the LoRA pair for '{target}' is A {a.shape} / B {b.shape}, but this model's "
                          f"layer needs A {want_a} / B {want_b} (r={rank}): the adapter was trained on another "
                          "model size (or its adapter_config.json 'r' is wrong)")


def merge_pair(cell: Linear, a: np.ndarray, b: np.ndarray, scaling: float) -> None:
    """W <- W + (B A) * scaling, as peft's merge_and_unload, in float32 then the weight's own dtype."""
    weight = cell.weight.asnumpy().astype(np.float32)
    cell.weight.set_data(Tensor(weight + (b @ a) * np.float32(scaling), cell.weight.dtype))


def apply_lora(network, config, path: str, merge: bool = True) -> list:
    """Apply peft LoRA dir `path` to a loaded network: merged into float weights (the default), or
    as LoRALinear cells wrapping them (merge=False, and always for quantized layers, whose
    integer weights cannot absorb it). A tensor-parallel network takes this rank's slices of
    each pair. Returns the adapted cell paths."""
    lora = read_lora_config(path)
    cells = dict(network.cells_and_names())
    pairs = read_lora_pairs(path, config)
    for target, (a, b) in pairs.items():
        _check_pair(path, target, cells[target], a, b, lora.r)
    for target, (a, b) in sorted(pairs.items()):
        cell = cells[target]
        if hasattr(cell, "low_rank_factors"):
            # one rank's share of a tensor-parallel layer (mindglm/parallel/layers.py): adapt the
            # local layer it wraps with this rank's slices of A and B
            a, b = cell.low_rank_factors(a, b, target)
            target, cell = target + ".local", cell.local
        if merge and isinstance(cell, Linear):
            merge_pair(cell, a, b, lora.scaling)
            continue
        wrapped = LoRALinear(cell, lora.r, lora.scaling, lora.lora_dropout)
        wrapped.lora_a.set_data(Tensor(a))
        wrapped.lora_b.set_data(Tensor(b))
        replace_cell(network, target, wrapped)
    return sorted(pairs)


def thudm_module(path: str, family: str) -> str:
    """THUDM's module name for a mindglm Linear path ('layers.0.attention.qkv' -> '...query_key_value')."""
    return thudm_name(path + ".weight", family)[: -len(".weight")]


def add_lora(network, config, target_modules, r: int, lora_alpha: float, lora_dropout: float = 0.0,
             seed: int = 0, use_rslora: bool = False) -> LoRAConfig:
    """Wrap every layer Linear whose THUDM module name is or ends with one of `target_modules`
    (peft's rule) in a trainable LoRALinear: A drawn as peft draws it (kaiming-uniform, a=sqrt(5):
    U(-1/sqrt(in), 1/sqrt(in))), B = 0, so training starts from the base model exactly."""
    lora = LoRAConfig(int(r), float(lora_alpha), list(target_modules), float(lora_dropout), bool(use_rslora))
    linears = [(path, cell) for path, cell in network.cells_and_names()
               if path.startswith("layers.") and isinstance(cell, Linear) and not isinstance(cell, LoRALinear)]
    names = {path: thudm_module(path, config.family) for path, _ in linears}
    chosen = [(path, cell) for path, cell in linears
              if any(names[path] == t or names[path].endswith("." + t) for t in lora.target_modules)]
    for target in lora.target_modules:
        if not any(names[p] == target or names[p].endswith("." + target) for p, _ in chosen):
            known = sorted({n.rsplit(".", 1)[-1] for n in names.values()})
            raise ConfigError(f"LoRA target_modules entry {target!r} matches no layer of a {config.family} model: "
                              f"choose from {', '.join(known)}")
    rng = np.random.default_rng(seed)
    for path, cell in chosen:
        wrapped = LoRALinear(cell, lora.r, lora.scaling, lora.lora_dropout)
        bound = 1.0 / math.sqrt(cell.in_features)
        wrapped.lora_a.set_data(Tensor(rng.uniform(-bound, bound, wrapped.lora_a.shape).astype(np.float32)))
        wrapped.lora_a.requires_grad = wrapped.lora_b.requires_grad = True
        replace_cell(network, path, wrapped)
    return lora
