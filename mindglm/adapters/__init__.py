"""Adapters applied to a built, loaded network: peft LoRA dirs and THUDM P-Tuning v2 checkpoints.

Both are rewrites (mindglm/rewrite.py), never flags inside layers: LoRA merges into the Linear
weights or wraps them (lora.py); P-Tuning wraps each SelfAttention with its layer's prefix
(prefix.py, read by ptuning.py).
"""
from __future__ import annotations

import os

from mindglm.adapters.lora import CONFIG_FILE as LORA_CONFIG, LoRALinear, apply_lora
from mindglm.adapters.prefix import PrefixAttention, PrefixEncoder, prefix_length
from mindglm.adapters.ptuning import apply_ptuning
from mindglm.config import ConfigError

__all__ = ["apply_adapter", "adapter_kind", "apply_lora", "apply_ptuning", "LoRALinear", "PrefixAttention",
           "PrefixEncoder", "prefix_length"]


def adapter_kind(path: str) -> str:
    """'lora' (a peft dir) or 'ptuning' (a THUDM P-Tuning v2 dir), or a ConfigError saying what DIR must hold."""
    if not os.path.isdir(path):
        raise ConfigError(f"adapter {path!r} is not a directory: pass a peft LoRA dir ({LORA_CONFIG} + "
                          "adapter_model.safetensors) or a THUDM P-Tuning v2 dir (config.json with pre_seq_len + "
                          "pytorch_model.bin)")
    if os.path.isfile(os.path.join(path, LORA_CONFIG)):
        return "lora"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "ptuning"
    raise ConfigError(f"adapter {path}: neither {LORA_CONFIG} (a peft LoRA dir) nor config.json (a THUDM "
                      "P-Tuning v2 dir) is in it")


def apply_adapter(network, config, path: str, merge: bool = True) -> str:
    """Apply the adapter in `path` to a loaded network; returns its kind. `merge` (LoRA only):
    fold it into the weights (faster), else keep it beside them as LoRALinear cells."""
    path = os.path.abspath(os.path.expanduser(path))
    kind = adapter_kind(path)
    if kind == "lora":
        apply_lora(network, config, path, merge)
    else:
        apply_ptuning(network, config, path)
    return kind
