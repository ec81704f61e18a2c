"""Reading THUDM P-Tuning v2 checkpoints: config.json (pre_seq_len, prefix_projection) + the
`transformer.prefix_encoder.*` tensors THUDM's ptuning/ trainer saves, into per-layer prefixes."""
from __future__ import annotations

import json
import os

import numpy as np
from mindspore import Tensor

from mindglm.adapters.prefix import PrefixEncoder, apply_prefix, split_layers
from mindglm.config import ConfigError, detect_family
from mindglm.io.sources import list_tensors
from mindglm.io.tensors import to_numpy

PREFIX = "transformer.prefix_encoder."


def read_ptuning_config(path: str) -> dict:
    """config.json of a P-Tuning v2 dir, which must say pre_seq_len."""
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{config_path}: cannot read it as JSON ({exc}); re-save the P-Tuning checkpoint") from None
    if not isinstance(raw, dict) or not raw.get("pre_seq_len"):
        raise ConfigError(f"{config_path} has no pre_seq_len: a P-Tuning v2 checkpoint's config.json says how "
                          "many prefix tokens it trained (THUDM's ptuning/ writes it); add \"pre_seq_len\": P "
                          "or pass the right directory")
    return raw


def _check_same_model(raw: dict, config, source: str) -> None:
    family = detect_family(raw)
    if (family == "chatglm") != (config.family == "chatglm"):
        raise ConfigError(f"{source} is a P-Tuning checkpoint for {family}, but the model is {config.family}: "
                          "use an adapter trained on this base model")
    for key, field in (("num_layers", "num_layers"), ("hidden_size", "hidden_size")):
        if key in raw and raw[key] != getattr(config, field):
            raise ConfigError(f"{source}: {key}={raw[key]} but the base model has {getattr(config, field)}: "
                              "the P-Tuning checkpoint was trained on another model size")


def prefix_encoder_from(path: str, config) -> PrefixEncoder:
    """The PrefixEncoder of a THUDM P-Tuning v2 dir, weights loaded, checked against `config`."""
    raw = read_ptuning_config(path)
    source = os.path.join(path, "config.json")
    _check_same_model(raw, config, source)
    pre_seq_len = int(raw["pre_seq_len"])
    tensors = {t.name[len(PREFIX):]: t for t in list_tensors(path) if t.name.startswith(PREFIX)}
    if "embedding.weight" not in tensors:
        raise ConfigError(f"{path} holds no '{PREFIX}embedding.weight': not a P-Tuning v2 checkpoint "
                          "(THUDM's ptuning/ saves the prefix encoder as pytorch_model.bin)")
    output_size = config.num_layers * 2 * config.kv_heads * config.head_dim
    rows, embedding_size = tensors["embedding.weight"].shape
    projection = bool(raw.get("prefix_projection"))
    projection_size = tensors["trans.0.weight"].shape[0] if projection and "trans.0.weight" in tensors else 0
    if projection and not projection_size:
        raise ConfigError(f"{source} says prefix_projection: true but {path} has no '{PREFIX}trans.0.weight'")
    if rows != pre_seq_len:
        raise ConfigError(f"{path}: the prefix embedding has {rows} rows but config.json says pre_seq_len="
                          f"{pre_seq_len}: the config and the weights are from different runs")
    # Without a projection the embedding rows are the prefixes themselves: their width is fixed.
    encoder = PrefixEncoder(pre_seq_len, embedding_size if projection else output_size, output_size, projection_size)
    for local, param in encoder.parameters_and_names():
        if local not in tensors:
            raise ConfigError(f"{path} lacks '{PREFIX}{local}' (prefix_projection={projection})")
        array = to_numpy(tensors[local].load()).astype(np.float32)
        if tuple(array.shape) != tuple(param.shape):
            raise ConfigError(f"{path}: '{PREFIX}{local}' has shape {tuple(array.shape)}, a prefix for this "
                              f"{config.family} model needs {tuple(param.shape)} (layers x 2 x kv heads x head "
                              "dim): the checkpoint is for another model size")
        param.set_data(Tensor(array))
    return encoder


def apply_ptuning(network, config, path: str) -> int:
    """Rewrite `network` with the prefixes of THUDM P-Tuning v2 dir `path` (computed once, here); returns P."""
    encoder = prefix_encoder_from(path, config)
    encoded = encoder().asnumpy()
    return apply_prefix(network, split_layers(encoded, config.num_layers, config.kv_heads, config.head_dim))
