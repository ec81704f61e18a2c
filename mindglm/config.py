"""GLMConfig: one dataclass for every GLM family, read from THUDM's config.json or from YAML."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

FAMILIES = ("chatglm", "chatglm2", "chatglm3")
# The sentencepiece file of each family's THUDM model directory.
TOKENIZER_FILES = {"chatglm": "ice_text.model", "chatglm2": "tokenizer.model", "chatglm3": "tokenizer.model"}
# What THUDM's modeling files build per family (their config.json leave these out for ChatGLM-6B).
_V2_NETWORK = {"rmsnorm": True, "add_bias_linear": False, "post_layer_norm": True,
               "apply_residual_connection_post_layernorm": False, "tie_word_embeddings": False}
FAMILY_NETWORK = {
    "chatglm": {"rmsnorm": False, "add_bias_linear": True, "post_layer_norm": True,
                "apply_residual_connection_post_layernorm": True, "tie_word_embeddings": True},
    "chatglm2": _V2_NETWORK, "chatglm3": _V2_NETWORK,
}
ROPE_SCALINGS = ("position", "base")
DTYPES = ("float32", "float16", "bfloat16")
LINEAR_BACKENDS = ("auto", "kernels", "portable")


class ConfigError(ValueError):
    """A configuration value a user can fix: the message names the key/file and the fix."""


@dataclass
class GLMConfig:
    """Hyper-parameters of a GLM network plus the few runtime switches the model needs.

    Field names follow THUDM's ChatGLM2/3 config.json; ChatGLM-6B's keys are mapped onto them
    (`inner_hidden_size` -> `ffn_hidden_size`, `max_sequence_length` -> `seq_length`).
    """

    family: str = "chatglm2"
    vocab_size: int = 65024
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    kv_channels: int = 128
    multi_query_group_num: int = 2
    ffn_hidden_size: int = 13696
    seq_length: int = 32768
    layernorm_epsilon: float = 1e-5
    # Network switches, honoured by the builders; None takes the family's value (FAMILY_NETWORK).
    rmsnorm: Optional[bool] = None
    add_qkv_bias: bool = True
    add_bias_linear: Optional[bool] = None
    post_layer_norm: Optional[bool] = None
    apply_residual_connection_post_layernorm: Optional[bool] = None
    tie_word_embeddings: Optional[bool] = None
    rotary_base: float = 10000.0
    rope_ratio: float = 1.0
    # How rope_ratio stretches the context: "position" divides positions (chatglm2-6b-32k),
    # "base" multiplies the rotary base (chatglm3-6b-32k). None: the family decides.
    rope_scaling: Optional[str] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Union[int, list, None] = 2
    pad_token_id: Optional[int] = 0
    mask_token_id: Optional[int] = None
    gmask_token_id: Optional[int] = None
    # runtime
    compute_dtype: str = "float32"
    param_dtype: str = "float32"
    use_past: bool = True
    use_flash_attention: bool = False
    # Weight-only quantization of the layers' four matrices (THUDM's `quantization_bit`): 0, 8 or 4.
    quantization_bit: int = 0
    # Also quantize the output layer (THUDM never does; chatglm.cpp does). ChatGLM2/3 only.
    quantize_output: bool = False
    # Storage dtype of unquantized Linear matrices; None: param_dtype. "float16" keeps them in fp16
    # and multiplies in float32 inside the CPU kernel (no float32 copy of the weights).
    weight_dtype: Optional[str] = None
    # How Linear layers multiply: "auto" (on CPU, mindglm's kernels for int8/int4/fp16 weights and
    # MindSpore's MatMul for float32; Ascend's WeightQuantBatchMatmul on Ascend), "kernels" (the
    # CPU kernels for float32 weights too: faster than MatMul on big matrices), "portable"
    # (dequantize + MatMul, needs no compiler). See mindglm/quantize.py.
    linear_backend: str = "auto"
    prefill_buckets: list = field(default_factory=lambda: [64, 128, 256, 512, 1024, 2048])

    def __post_init__(self):
        for key, value in FAMILY_NETWORK.get(self.family, {}).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads actually stored (GLM v1: one per query head)."""
        return self.multi_query_group_num

    @property
    def rotary_dims(self) -> int:
        """Dimensions of each head that are rotated: ChatGLM2/3 rotate the first half."""
        return self.head_dim // 2

    @property
    def effective_rope_scaling(self) -> str:
        if self.rope_scaling is not None:
            return self.rope_scaling
        return "base" if self.family == "chatglm3" else "position"

    @property
    def pad_id(self) -> int:
        """The id left padding uses (0 when the config names none)."""
        return self.pad_token_id or 0

    @property
    def eos_token_ids(self) -> list:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return list(self.eos_token_id)

    # ------------------------------------------------------------------ checks
    def validate(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"config key 'family' is {self.family!r}; expected one of {FAMILIES}")
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), _FIELD_TYPES[f.name], "GLMConfig")
        if self.rope_scaling is not None and self.rope_scaling not in ROPE_SCALINGS:
            raise ConfigError(
                f"config key 'rope_scaling' is {self.rope_scaling!r}; expected one of {ROPE_SCALINGS}")
        if self.quantization_bit not in (0, 4, 8):
            raise ConfigError(f"config key 'quantization_bit' is {self.quantization_bit!r}: THUDM's weight-only "
                              "quantization has 8 or 4 bits (0: none)")
        if self.weight_dtype not in (None, "float32", "float16"):
            raise ConfigError(f"config key 'weight_dtype' is {self.weight_dtype!r}; expected float16, float32 or null")
        if self.linear_backend not in LINEAR_BACKENDS:
            raise ConfigError(f"config key 'linear_backend' is {self.linear_backend!r}; expected one of "
                              f"{LINEAR_BACKENDS}")
        if self.quantize_output and self.tie_word_embeddings:
            raise ConfigError("quantize_output needs a separate output layer; ChatGLM-6B's is tied to the "
                              "embedding: set quantize_output false")
        for key in ("compute_dtype", "param_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ConfigError(f"config key '{key}' is {getattr(self, key)!r}; expected one of {DTYPES}")
        if self.num_attention_heads % self.multi_query_group_num:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"multi_query_group_num ({self.multi_query_group_num})")
        if self.family == "chatglm" and self.multi_query_group_num != self.num_attention_heads:
            raise ConfigError("ChatGLM-6B has one key/value head per query head: set "
                              "multi_query_group_num equal to num_attention_heads")
        if self.family == "chatglm" and not self.apply_residual_connection_post_layernorm:
            raise ConfigError("ChatGLM-6B always takes its residuals from the norm outputs (scaled by "
                              "sqrt(2 * 28)): set apply_residual_connection_post_layernorm to true, or leave it out")
        if self.family == "chatglm":
            for key in ("bos_token_id", "mask_token_id", "gmask_token_id"):
                if getattr(self, key) is None:
                    raise ConfigError(f"ChatGLM-6B needs '{key}' in its config (see config.json)")
        for key in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "kv_channels",
                    "multi_query_group_num", "ffn_hidden_size", "seq_length"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"config key '{key}' must be positive, got {getattr(self, key)}")

    # ------------------------------------------------------------------ readers
    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "GLMConfig":
        """Build from mindglm field names (YAML `model.model_config`); unknown keys are errors."""
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a mapping of config keys, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"{source}: unknown config key '{key}' (known keys: {', '.join(sorted(known))})")
            _check_type(key, value, _FIELD_TYPES[key], source)
        return cls(**values)

    @classmethod
    def from_thudm(cls, path: str, **overrides) -> "GLMConfig":
        """Read THUDM's config.json (a file, or a model directory that holds one)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"no config.json at {path}: point to a THUDM model directory "
                              "(config.json + weights) or to the config.json itself")
        try:
            with open(path, encoding="utf-8") as fh:
                raw = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}); re-download config.json") from exc
        values = thudm_to_fields(raw, source=path)
        values.update(overrides)
        return cls.from_dict(values, source=path)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Keys of THUDM config.json files that describe training or PyTorch details with no effect here.
_THUDM_IGNORED = {
    "_name_or_path", "architectures", "auto_map", "model_type", "use_cache", "torch_dtype",
    "transformers_version", "apply_query_key_layer_scaling", "attention_softmax_in_fp32",
    "fp32_residual_connection", "bias_dropout_fusion", "hidden_dropout", "attention_dropout",
    "original_rope", "multi_query_attention", "classifier_dropout", "position_encoding_2d",
    "pre_seq_len", "prefix_projection", "interleaved_qkv", "num_image_tokens",
    "max_length", "initializer_range", "is_encoder_decoder",
}
# THUDM key -> mindglm field
_THUDM_RENAMED = {
    "padded_vocab_size": "vocab_size",
    "inner_hidden_size": "ffn_hidden_size",
    "max_sequence_length": "seq_length",
}


def detect_family(raw: dict) -> str:
    """ChatGLM-6B has 2D positions; ChatGLM2 and ChatGLM3 differ only in `_name_or_path`."""
    if "position_encoding_2d" in raw or "inner_hidden_size" in raw:
        return "chatglm"
    name = str(raw.get("_name_or_path", "")).lower()
    return "chatglm3" if "chatglm3" in name else "chatglm2"


def thudm_to_fields(raw: dict, source: str = "config.json") -> dict:
    """Map a THUDM config.json dict onto GLMConfig field names."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    if raw.get("pre_seq_len"):
        raise ConfigError(f"{source}: pre_seq_len={raw['pre_seq_len']} is a P-Tuning v2 checkpoint; "
                          "mindglm does not load prefix encoders yet: use the base model's config")
    if raw.get("quantization_embeddings"):
        raise ConfigError(f"{source}: quantization_embeddings=true (int4 embeddings) is not supported: "
                          "quantize from the fp16 weights with `python -m ckpt_convert --quantize int4`")
    family = detect_family(raw)
    values: dict[str, Any] = {"family": family}
    known = {f.name for f in dataclasses.fields(GLMConfig)}
    for key, value in raw.items():
        if key in _THUDM_IGNORED or key == "quantization_embeddings":
            continue
        name = _THUDM_RENAMED.get(key, key)
        if name not in known:
            raise ConfigError(f"{source}: unknown config key '{key}'; is this a THUDM ChatGLM config.json?")
        if value is None and name not in ("eos_token_id", "bos_token_id", "pad_token_id",
                                          "mask_token_id", "gmask_token_id", "rope_ratio", "quantization_bit"):
            raise ConfigError(f"{source}: config key '{key}' is null")
        if value is None:
            continue
        values[name] = value
    if family == "chatglm":
        heads = values.get("num_attention_heads", 32)
        values.setdefault("kv_channels", values.get("hidden_size", 4096) // heads)
        values["multi_query_group_num"] = heads
    else:
        values.setdefault("bos_token_id", None)
    if isinstance(values.get("rope_ratio"), int):
        values["rope_ratio"] = float(values["rope_ratio"])
    if isinstance(values.get("layernorm_epsilon"), int):
        values["layernorm_epsilon"] = float(values["layernorm_epsilon"])
    return values


_FIELD_TYPES = {
    "family": str, "vocab_size": int, "hidden_size": int, "num_layers": int,
    "num_attention_heads": int, "kv_channels": int, "multi_query_group_num": int,
    "ffn_hidden_size": int, "seq_length": int, "layernorm_epsilon": float, "rmsnorm": bool,
    "add_qkv_bias": bool, "add_bias_linear": bool, "post_layer_norm": bool,
    "apply_residual_connection_post_layernorm": bool, "tie_word_embeddings": bool,
    "rotary_base": float, "rope_ratio": float, "rope_scaling": (str, type(None)),
    "bos_token_id": (int, type(None)), "eos_token_id": (int, list, type(None)),
    "pad_token_id": (int, type(None)), "mask_token_id": (int, type(None)),
    "gmask_token_id": (int, type(None)), "compute_dtype": str, "param_dtype": str,
    "use_past": bool, "use_flash_attention": bool, "prefill_buckets": list,
    "quantization_bit": int, "quantize_output": bool, "weight_dtype": (str, type(None)), "linear_backend": str,
}


def is_type(value: Any, types) -> bool:
    """isinstance for config values, the one rule every config reader uses: a bool is never a
    number (True is an int in Python), and an int is also a float (YAML/JSON write 1 for 1.0)."""
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def type_names(types) -> str:
    """`types` as a message says them: "int or null", "a mapping", ..."""
    types = types if isinstance(types, tuple) else (types,)
    names = {type(None): "null", dict: "a mapping", list: "a list"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _check_type(key: str, value: Any, expected, source: str):
    if not is_type(value, expected):
        raise ConfigError(f"{source}: config key '{key}' must be {type_names(expected)}, got {value!r} "
                          f"({type(value).__name__})")
    if key == "eos_token_id" and isinstance(value, list) and not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{source}: config key 'eos_token_id' must be an int or a list of ints")
    if key == "prefill_buckets" and not all(isinstance(v, int) and v > 0 for v in value):
        raise ConfigError(f"{source}: config key 'prefill_buckets' must be a list of positive ints")
