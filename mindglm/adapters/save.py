"""Writing adapters in the formats others read: LoRA as peft's `save_pretrained` writes it,
P-Tuning v2 as THUDM's ptuning/ trainer does. Both go to a temporary directory first, renamed
into place when complete, so a crash never leaves a half-written adapter under the final name."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import numpy as np

from mindglm.adapters.lora import CONFIG_FILE, LoRAConfig, LoRALinear, thudm_module
from mindglm.adapters.ptuning import PREFIX
from mindglm.checkpoint import qkv_grouped_to_v1
from mindglm.io.safetensors_io import write_safetensors
from mindglm.io.tensors import dtype_of
from mindglm.io.torch_bin import save_torch_bin


@contextlib.contextmanager
def atomic_dir(path: str):
    """Yield a temporary directory beside `path`; on success it replaces `path` (a rename)."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=os.path.basename(path) + ".old-", dir=parent)
        os.replace(path, os.path.join(old, "previous"))
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def lora_tensors(network, config) -> list:
    """[(peft name, float32 array)] of every LoRALinear in `network`, B rows in THUDM's qkv order."""
    out = []
    for path, cell in network.cells_and_names():
        if not isinstance(cell, LoRALinear):
            continue
        module = thudm_module(path, config.family)
        a, b = cell.lora_a.asnumpy().astype(np.float32), cell.lora_b.asnumpy().astype(np.float32)
        if config.family == "chatglm" and path.endswith("attention.qkv"):
            b = qkv_grouped_to_v1(b, config.num_attention_heads, config.kv_channels)
        out += [(f"base_model.model.{module}.lora_A.weight", a), (f"base_model.model.{module}.lora_B.weight", b)]
    return out


def save_lora(network, config, path: str, lora: LoRAConfig, base_model: str = "") -> None:
    """Write `network`'s LoRA as a peft dir (adapter_config.json + adapter_model.safetensors)."""
    tensors = lora_tensors(network, config)
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.r, "lora_alpha": lora.lora_alpha,
        "lora_dropout": lora.lora_dropout, "target_modules": sorted(set(lora.target_modules)), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": lora.use_rslora,
        "use_dora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "base_model_name_or_path": base_model, "layers_to_transform": None, "layers_pattern": None,
    }
    with atomic_dir(path) as tmp:
        specs = [(name, array.shape, dtype_of(array).name) for name, array in tensors]
        write_safetensors(os.path.join(tmp, "adapter_model.safetensors"), specs, (a for _, a in tensors))
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as fh:
            json.dump(peft_config, fh, indent=2)


def save_ptuning(encoder, path: str, base_config_json: dict) -> None:
    """Write a PrefixEncoder as THUDM's P-Tuning v2 checkpoint: the base model's config.json plus
    pre_seq_len / prefix_projection, and pytorch_model.bin with `transformer.prefix_encoder.*`."""
    raw = dict(base_config_json)
    raw.update(pre_seq_len=encoder.pre_seq_len, prefix_projection=encoder.trans is not None)
    tensors = [(PREFIX + name, param.asnumpy().astype(np.float32)) for name, param in encoder.parameters_and_names()]
    with atomic_dir(path) as tmp:
        save_torch_bin(os.path.join(tmp, "pytorch_model.bin"), tensors)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as fh:
            json.dump(raw, fh, indent=2)
