"""Name maps and layout transforms between THUDM, MindFormers and mindglm parameter names.

Pure numpy: nothing here imports MindSpore or reads files. `ckpt_convert` streams tensors through
these functions; `mindglm.load_model` gets its arrays from `mindglm.io.weights.iter_mindglm_tensors`.

mindglm names (the contract the network is built against; matrices are [out, in] like torch):

    embedding.weight                         [vocab, hidden]
    layers.{i}.input_norm.{weight,bias*}     [hidden]
    layers.{i}.attention.qkv.{weight,bias}   [(heads + 2*kv_groups)*head_dim, hidden]: q of all
                                             heads, then k of all groups, then v of all groups
    layers.{i}.attention.dense.{weight,bias*} [hidden, heads*head_dim]
    layers.{i}.post_attention_norm.{weight,bias*}
    layers.{i}.mlp.up.{weight,bias*}         v2/v3: [2*ffn, hidden] (gate rows, then up rows);
                                             v1: [ffn, hidden]
    layers.{i}.mlp.down.{weight,bias*}       [hidden, ffn]
    final_norm.{weight,bias*}
    output.weight                            [vocab, hidden], v2/v3 only (v1 ties it to the embedding)
    (* v1 only: LayerNorm biases and linear biases)

THUDM checkpoints (checked against the fixtures' index files):

- ChatGLM2/3: `transformer.embedding.word_embeddings.weight`, `transformer.encoder.layers.N.` +
  `input_layernorm.weight`, `self_attention.query_key_value.{weight,bias}` (already q|k|v),
  `self_attention.dense.weight`, `post_attention_layernorm.weight`, `mlp.dense_h_to_4h.weight`,
  `mlp.dense_4h_to_h.weight`; `transformer.encoder.final_layernorm.weight`,
  `transformer.output_layer.weight`; buffer `transformer.rotary_pos_emb.inv_freq` (ignored).
- ChatGLM-6B: `transformer.word_embeddings.weight`, `transformer.layers.N.` + `input_layernorm`,
  `attention.query_key_value`, `attention.dense`, `post_attention_layernorm`, `mlp.dense_h_to_4h`,
  `mlp.dense_4h_to_h` (all with weight and bias), `transformer.final_layernorm.{weight,bias}`,
  buffer `transformer.layers.N.attention.rotary_emb.inv_freq` (ignored) and `lm_head.weight`,
  tied to the embedding (checked equal by the converter, then dropped). The fused qkv rows are
  interleaved per head: rows [h*3d, h*3d+d) are head h's q, the next d its k, the next d its v.
  mindglm regroups them (q of all heads, k of all, v of all) and `to_thudm` interleaves back.

MindFormers checkpoints (read from mindspore-lab/mindformers: `models/glm2/convert_weight.py`,
`convert_reversed.py`, `glm2.py`, `glm2_transformer.py`, `glm2_modules.py`, and
`models/glm/convert_weight.py`, `glm/attention.py`):

- ChatGLM2/3: their converter keeps THUDM's names except the embedding: older releases write
  `transformer.embedding.embedding_table` (`word_embeddings.weight` -> `embedding_table`), newer
  models (a `LlamaEmbedding`) name it `transformer.embedding.embedding_weight`; both are accepted.
  Checkpoints saved by MindFormers training with `qkv_concat: False` hold
  `self_attention.{wq,wk,wv}.{weight,bias}` instead of `query_key_value`, and with
  `mlp_concat: False` `mlp.dense_left.weight` (gate) + `mlp.dense_right.weight` (up) instead of
  `dense_h_to_4h`: these pieces are concatenated by rows. Their Linear layers store [out, in],
  like torch. Caveat: a checkpoint trained with `use_rearrange_rope: True` permutes the rows of
  each q/k head (MindFormers' own reverse converter undoes it); names cannot tell, so mindglm
  assumes THUDM's row order, which is what MindFormers' forward converter writes.
- ChatGLM-6B: `transformer.word_embeddings.embedding_table`, LayerNorm `gamma`/`beta` for
  `weight`/`bias`, everything else THUDM's names; the fused qkv keeps THUDM's per-head interleave
  (their attention views it as [heads, 3*head_dim]).
- Both: the rotary `inv_freq` buffers and optimizer/training state saved next to the weights
  (`adam_m.*`, `adam_v.*`, `global_step`, `learning_rate`, `scale_sense`, ...) are ignored.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np

from mindglm.config import FAMILIES, GLMConfig

SOURCES = ("thudm", "mindformers", "mindglm")


class CheckpointError(ValueError):
    """A checkpoint a user can fix (wrong file, wrong config, corrupt or incomplete download)."""


# ---------------------------------------------------------------------------------- mindglm shapes

# mindglm modules whose `.weight` THUDM quantizes; the output layer only on request.
QUANTIZED_MODULES = ("attention.qkv", "attention.dense", "mlp.up", "mlp.down")
OUTPUT_MODULE = "output"


def quantized_module(name: str, quantize_output: bool = False) -> bool:
    """Is mindglm module `name` (e.g. 'layers.3.mlp.up', without '.weight') stored quantized?"""
    if name == OUTPUT_MODULE:
        return quantize_output
    return name.startswith("layers.") and name.split(".", 2)[-1] in QUANTIZED_MODULES


def packed_columns(in_features: int, bits: int) -> int:
    """Stored columns of an [out, in] matrix: in, or in/2 bytes for int4."""
    if bits == 4:
        if in_features % 2:
            raise CheckpointError(f"int4 packs two weights per byte along the input axis, but this matrix has "
                                  f"an odd input size ({in_features}): quantize it to int8 instead")
        return in_features // 2
    return in_features


def expected_shapes(config: GLMConfig) -> dict:
    """Every mindglm tensor name of `config`'s checkpoint mapped to its shape, in network order.

    With `quantization_bit` the quantized matrices are int8 [out, in] (int4: [out, in/2]) plus a
    `.weight_scale` [out] each, as THUDM stores them (mindglm/weight_formats.py)."""
    hidden, ffn, head_dim = config.hidden_size, config.ffn_hidden_size, config.kv_channels
    qkv_rows = (config.num_attention_heads + 2 * config.multi_query_group_num) * head_dim
    up_rows = ffn if config.family == "chatglm" else 2 * ffn
    norm_bias = not config.rmsnorm
    shapes = {"embedding.weight": (config.vocab_size, hidden)}

    bits = config.quantization_bit

    def add(name, rows, cols=None, bias=False):
        shapes[name + ".weight"] = (rows,) if cols is None else (rows, cols)
        if cols is not None and bits and quantized_module(name, config.quantize_output):
            shapes[name + ".weight"] = (rows, packed_columns(cols, bits))
            shapes[name + ".weight_scale"] = (rows,)
        if bias:
            shapes[name + ".bias"] = (rows,)

    for i in range(config.num_layers):
        p = f"layers.{i}."
        add(p + "input_norm", hidden, bias=norm_bias)
        add(p + "attention.qkv", qkv_rows, hidden, bias=config.add_qkv_bias or config.add_bias_linear)
        add(p + "attention.dense", hidden, config.num_attention_heads * head_dim, bias=config.add_bias_linear)
        add(p + "post_attention_norm", hidden, bias=norm_bias)
        add(p + "mlp.up", up_rows, hidden, bias=config.add_bias_linear)
        add(p + "mlp.down", hidden, ffn, bias=config.add_bias_linear)
    if config.post_layer_norm:
        add("final_norm", hidden, bias=norm_bias)
    if not config.tie_word_embeddings:
        add("output", config.vocab_size, hidden)
    return shapes


def _config_summary(config: GLMConfig) -> str:
    keys = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "multi_query_group_num",
            "kv_channels", "ffn_hidden_size")
    return ", ".join(f"{k}={getattr(config, k)}" for k in keys)


def check_shape(name: str, shape, expected, config: GLMConfig, config_source: str = "config.json",
                target: Optional[str] = None):
    """Raise CheckpointError naming the tensor, its shape, the expected one and the config file."""
    shape, expected = tuple(int(s) for s in shape), tuple(expected)
    if shape == expected:
        return
    what = f"tensor '{name}'" + (f" (mindglm '{target}')" if target and target != name else "")
    raise CheckpointError(
        f"{what} has shape {shape} but {config_source} expects {expected} "
        f"({_config_summary(config)}): do {config_source} and these weights belong to the same model?")


# ---------------------------------------------------------------------------------- name tables

@dataclass(frozen=True)
class Piece:
    """How one source tensor becomes (part of) one mindglm tensor.

    kind: "copy" (rename only), "qkv_v1" (regroup ChatGLM-6B's per-head interleaved rows),
    "part" (rows `part` of `parts` row blocks concatenated into `target`), "tied" (v1 lm_head:
    must equal `target`, then dropped), "ignore" (buffers and optimizer state).
    """
    source: str
    target: str = ""
    kind: str = "copy"
    part: int = 0
    parts: int = 1


_V2 = r"transformer\.encoder\.layers\.(?P<layer>\d+)\."
_V1 = r"transformer\.layers\.(?P<layer>\d+)\."
_WB = r"\.(?P<wb>weight_scale|weight|bias)"  # weight_scale: THUDM's int8/int4 per-row scales
_LN = r"\.(?P<wb>gamma|beta)"  # MindFormers' LayerNorm parameter names


def _layer(prefix, module, target, kind="copy", part=0, parts=1, wb=_WB):
    """A rule for a per-layer tensor: `prefix` + `module` + .weight/.bias -> layers.{i}.`target`."""
    return prefix + module + wb, "layers.{layer}." + target + ".{wb}", kind, part, parts


# (source regex, mindglm template, kind[, part, parts]); {layer} and {wb} come from the match.
_V2_THUDM = [
    (r"transformer\.embedding\.word_embeddings\.weight", "embedding.weight", "copy"),
    _layer(_V2, r"input_layernorm", "input_norm"),
    _layer(_V2, r"self_attention\.query_key_value", "attention.qkv"),
    _layer(_V2, r"self_attention\.dense", "attention.dense"),
    _layer(_V2, r"post_attention_layernorm", "post_attention_norm"),
    _layer(_V2, r"mlp\.dense_h_to_4h", "mlp.up"),
    _layer(_V2, r"mlp\.dense_4h_to_h", "mlp.down"),
    (r"transformer\.encoder\.final_layernorm" + _WB, "final_norm.{wb}", "copy"),
    (r"transformer\.output_layer\.(?P<wb>weight_scale|weight)", "output.{wb}", "copy"),
    (r"transformer\.rotary_pos_emb\.inv_freq", "", "ignore"),
]
_V2_MINDFORMERS = [
    (r"transformer\.embedding\.(embedding_weight|embedding_table|word_embeddings\.embedding_table)",
     "embedding.weight", "copy"),
    _layer(_V2, r"self_attention\.wq", "attention.qkv", "part", 0, 3),
    _layer(_V2, r"self_attention\.wk", "attention.qkv", "part", 1, 3),
    _layer(_V2, r"self_attention\.wv", "attention.qkv", "part", 2, 3),
    _layer(_V2, r"mlp\.dense_left", "mlp.up", "part", 0, 2),
    _layer(_V2, r"mlp\.dense_right", "mlp.up", "part", 1, 2),
]
_V1_THUDM = [
    (r"transformer\.word_embeddings\.weight", "embedding.weight", "copy"),
    _layer(_V1, r"input_layernorm", "input_norm"),
    _layer(_V1, r"attention\.query_key_value", "attention.qkv", "qkv_v1"),
    _layer(_V1, r"attention\.dense", "attention.dense"),
    _layer(_V1, r"post_attention_layernorm", "post_attention_norm"),
    _layer(_V1, r"mlp\.dense_h_to_4h", "mlp.up"),
    _layer(_V1, r"mlp\.dense_4h_to_h", "mlp.down"),
    (r"transformer\.final_layernorm" + _WB, "final_norm.{wb}", "copy"),
    (r"lm_head\.weight", "embedding.weight", "tied"),
    (_V1 + r"attention\.rotary_emb\.inv_freq", "", "ignore"),
]
_V1_MINDFORMERS = [
    (r"transformer\.word_embeddings\.embedding_table", "embedding.weight", "copy"),
    _layer(_V1, r"input_layernorm", "input_norm", wb=_LN),
    _layer(_V1, r"post_attention_layernorm", "post_attention_norm", wb=_LN),
    (r"transformer\.final_layernorm" + _LN, "final_norm.{wb}", "copy"),
]
# Training state MindFormers saves next to the weights.
_TRAINING_STATE = [
    (r"(adam_m|adam_v|moment1|moment2|accu_grads|accumulated_grads)\..*", "", "ignore"),
    (r"global_step|learning_rate|scale_sense|loss_scale|epoch_num|step_num|beta1_power|beta2_power"
     r"|current_iterator_step|last_overflow_iterator_step", "", "ignore"),
]
_MINDGLM = [
    (r"embedding\.weight|output\.weight|final_norm\.(weight|bias)", "{name}", "copy"),
    (r"output\.weight_scale", "{name}", "copy"),
    (r"layers\.\d+\.(input_norm|post_attention_norm|attention\.qkv|attention\.dense|mlp\.up|mlp\.down)"
     r"\.(weight|bias|weight_scale)", "{name}", "copy"),
]
_LN_NAME = {"gamma": "weight", "beta": "bias"}


def _compile(rules):
    return [(re.compile(r[0]), r[1], r[2], *(r[3:] or (0, 1))) for r in rules]


_TABLES = {
    ("chatglm", "thudm"): _compile(_V1_THUDM),
    ("chatglm", "mindformers"): _compile(_V1_MINDFORMERS + _V1_THUDM + _TRAINING_STATE),
    ("chatglm2", "thudm"): _compile(_V2_THUDM),
    ("chatglm2", "mindformers"): _compile(_V2_MINDFORMERS + _V2_THUDM + _TRAINING_STATE),
    ("chatglm", "mindglm"): _compile(_MINDGLM),
    ("chatglm2", "mindglm"): _compile(_MINDGLM),
}


def _table_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return "chatglm" if family == "chatglm" else "chatglm2"


def map_name(name: str, family: str, source: Optional[str] = None) -> Piece:
    """Where source tensor `name` goes in mindglm (see `Piece`); unknown names raise CheckpointError.

    source: "thudm", "mindformers" (which also accepts THUDM's names), "mindglm", or None to
    detect it from `name` alone (see `detect_source`).
    """
    source = source or detect_source([name])
    if source not in SOURCES:
        raise ValueError(f"unknown checkpoint source {source!r}; expected one of {SOURCES}")
    for pattern, template, kind, part, parts in _TABLES[(_table_family(family), source)]:
        match = pattern.fullmatch(name)
        if match is None:
            continue
        groups = match.groupdict()
        wb = _LN_NAME.get(groups.get("wb"), groups.get("wb"))
        target = template.format(layer=groups.get("layer"), wb=wb, name=name)
        return Piece(source=name, target=target, kind=kind, part=part, parts=parts)
    family_name = {"chatglm": "ChatGLM-6B"}.get(family, "ChatGLM2/3")
    raise CheckpointError(
        f"unknown tensor '{name}' for a {family_name} checkpoint in {source} naming: is this the "
        f"right model (config.json family '{family}') and an unmodified checkpoint?")


def detect_source(names: Iterable[str]) -> str:
    """Tell THUDM, MindFormers and mindglm naming apart from a checkpoint's tensor names."""
    names = list(names)
    if any(n == "embedding.weight" or n.startswith("layers.") for n in names):
        return "mindglm"
    mindformers = re.compile(r"embedding_weight|embedding_table|\.gamma$|\.beta$|\.w[qkv]\.|dense_left"
                             r"|dense_right|^adam_[mv]\.|^global_step$")
    if any(mindformers.search(n) for n in names):
        return "mindformers"
    return "thudm"


def detect_family(names: Iterable[str]) -> str:
    """'chatglm' (v1) or 'chatglm2' (v2/v3 share one layout) from tensor names alone."""
    for n in names:
        if n.startswith("transformer.encoder.") or n.startswith("transformer.embedding.") or n == "output.weight":
            return "chatglm2"
        if n.startswith("transformer.layers.") or n.startswith("transformer.word_embeddings.") \
                or n.endswith("input_norm.bias"):
            return "chatglm"
    return "chatglm2"


# ---------------------------------------------------------------------------------- layouts

def qkv_v1_to_grouped(array: np.ndarray, num_heads: int, head_dim: int) -> np.ndarray:
    """ChatGLM-6B's per-head [q_h k_h v_h] rows -> [q of all heads, k of all, v of all]."""
    rest = array.shape[1:]
    return np.ascontiguousarray(
        array.reshape(num_heads, 3, head_dim, *rest).swapaxes(0, 1)).reshape(array.shape)


def qkv_grouped_to_v1(array: np.ndarray, num_heads: int, head_dim: int) -> np.ndarray:
    """Inverse of `qkv_v1_to_grouped`: back to THUDM ChatGLM-6B's per-head interleave."""
    rest = array.shape[1:]
    return np.ascontiguousarray(
        array.reshape(3, num_heads, head_dim, *rest).swapaxes(0, 1)).reshape(array.shape)


def _part_rows(target: str, parts: int, config: GLMConfig) -> list:
    """Row counts of the `parts` blocks that make up `target` (MindFormers split q/k/v, gate/up)."""
    if ".attention.qkv." in target:
        q = config.num_attention_heads * config.kv_channels
        kv = config.multi_query_group_num * config.kv_channels
        return [q, kv, kv]
    return [config.ffn_hidden_size] * parts


def _transform(piece: Piece, array: np.ndarray, config: Optional[GLMConfig]) -> np.ndarray:
    if piece.kind == "qkv_v1":
        if config is None:
            raise CheckpointError(f"'{piece.source}': ChatGLM-6B's qkv layout needs the model's config.json")
        return qkv_v1_to_grouped(array, config.num_attention_heads, config.kv_channels)
    return array


def to_mindglm(name: str, array: np.ndarray, config: GLMConfig, source: Optional[str] = None) -> list:
    """Map one whole source tensor to [(mindglm_name, array)]; [] for ignored buffers and v1's tied
    lm_head. source: "thudm", "mindformers", "mindglm" or None (detected from the name). Shapes
    are checked against `config`. MindFormers' split pieces (wq/wk/wv, dense_left/right) need
    their siblings: use `plan_to_mindglm` + `build_target` for those."""
    piece = map_name(name, config.family, source)
    if piece.kind in ("ignore", "tied"):
        return []
    if piece.kind == "part":
        raise CheckpointError(f"'{name}' is one of {piece.parts} pieces of '{piece.target}': convert it "
                              "together with its siblings (plan_to_mindglm / ckpt_convert)")
    expected = expected_shapes(config)
    if piece.target not in expected:
        raise _unexpected(piece, config)
    check_shape(name, array.shape, expected[piece.target], config, target=piece.target)
    return [(piece.target, _transform(piece, array, config))]


def _unexpected(piece: Piece, config: GLMConfig, config_source: str = "config.json") -> CheckpointError:
    layer = re.match(r"layers\.(\d+)\.", piece.target)
    if layer and int(layer.group(1)) >= config.num_layers:
        return CheckpointError(f"tensor '{piece.source}' belongs to layer {layer.group(1)} but {config_source} "
                               f"has num_layers={config.num_layers}")
    return CheckpointError(f"tensor '{piece.source}' ('{piece.target}') has no place in a network with "
                           f"{config_source} ({_config_summary(config)}, add_bias_linear="
                           f"{config.add_bias_linear}, tie_word_embeddings={config.tie_word_embeddings})")


# ---------------------------------------------------------------------------------- quantized storage

def stored_quantization(shapes: dict, int_names: set, family: str, source: str,
                        hidden_size: Optional[int] = None) -> tuple:
    """(bits, output quantized) of a checkpoint, from its names, shapes and which tensors are int8.

    Layer 0's qkv has `hidden_size` inputs (default: the embedding's width), so its stored columns
    tell int8 (hidden) from int4 (hidden / 2). Every other shape is then checked by the plan."""
    targets = {}
    for name, shape in shapes.items():
        piece = map_name(name, family, source)
        if piece.kind not in ("ignore", "tied"):
            targets[piece.target] = (name, tuple(shape))
    quantized = {t for t, (name, _) in targets.items() if name in int_names or t.endswith(".weight_scale")}
    if not quantized:
        return 0, False
    hidden = hidden_size or targets.get("embedding.weight", (None, (0, 0)))[1][1]
    name, shape = targets.get("layers.0.attention.qkv.weight", (None, None))
    if name is None or name not in int_names:
        raise CheckpointError(f"the checkpoint holds quantized tensors (e.g. '{sorted(quantized)[0]}') but layer "
                              "0's query_key_value weight is missing or not int8: the checkpoint is incomplete "
                              "or mixes formats")
    if len(shape) != 2 or shape[1] not in (hidden, hidden // 2):
        raise CheckpointError(f"'{name}' is int8 of shape {shape}: an int8 matrix stores {hidden} columns "
                              f"(the hidden size), an int4 one {hidden // 2} (two per byte); the file is corrupt "
                              "or not THUDM's format")
    return (8 if shape[1] == hidden else 4), "output.weight" in quantized


# ---------------------------------------------------------------------------------- planning

@dataclass
class Target:
    """One mindglm tensor to produce: its name, shape and the source pieces it is built from."""
    name: str
    shape: tuple
    pieces: list = field(default_factory=list)


@dataclass
class Plan:
    """Output of `plan_to_mindglm`: targets in source order, tied tensors to verify, ignored names."""
    targets: list
    tied: list
    ignored: list
    source: str
    family: str


def plan_to_mindglm(shapes: dict, config: Optional[GLMConfig], source: Optional[str] = None,
                    family: Optional[str] = None, config_source: str = "config.json") -> Plan:
    """Plan a whole conversion from source names and shapes only (no data read).

    `shapes` maps each source tensor name to its shape. With a config every shape is checked,
    every expected mindglm tensor must be present (errors name the tensor) and targets come in
    network order (`expected_shapes`); without one (`family` is then detected from the names if
    not given) names are mapped and pieces fused unchecked, in source order.
    """
    source = source or detect_source(shapes)
    family = config.family if config is not None else (family or detect_family(shapes))
    expected = expected_shapes(config) if config is not None else None
    targets: dict = {}
    tied, ignored = [], []
    for name, shape in shapes.items():
        piece = map_name(name, family, source)
        if piece.kind == "ignore":
            ignored.append(name)
            continue
        if piece.kind == "tied":
            tied.append(piece)
            continue
        target = targets.setdefault(piece.target, Target(piece.target, None))
        if any(p.part == piece.part for p in target.pieces):
            other = next(p.source for p in target.pieces if p.part == piece.part)
            raise CheckpointError(f"tensors '{other}' and '{name}' both provide mindglm '{piece.target}'; "
                                  "the checkpoint mixes two naming schemes or holds a duplicate")
        target.pieces.append(piece)
        if expected is not None:
            if piece.target not in expected:
                raise _unexpected(piece, config, config_source)
            want = expected[piece.target]
            if piece.kind == "part":
                want = (_part_rows(piece.target, piece.parts, config)[piece.part],) + want[1:]
            check_shape(name, shape, want, config, config_source, piece.target)
    for target in targets.values():
        target.pieces.sort(key=lambda p: p.part)
        parts = target.pieces[0].parts
        if len(target.pieces) != parts:
            have = ", ".join(p.source for p in target.pieces)
            raise CheckpointError(f"mindglm '{target.name}' is built from {parts} pieces but the checkpoint "
                                  f"only has {have}; the checkpoint is incomplete")
        piece_shapes = [tuple(shapes[p.source]) for p in target.pieces]
        rows = sum(s[0] for s in piece_shapes)
        target.shape = (rows,) + piece_shapes[0][1:] if parts > 1 else piece_shapes[0]
    if expected is not None:
        missing = [n for n in expected if n not in targets]
        if missing:
            names = ", ".join(f"'{n}' ({thudm_name(n, family)})" for n in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CheckpointError(f"the checkpoint has no tensor for {names}{more}: the download is incomplete "
                                  f"or {config_source} does not belong to it")
        ordered = [targets[n] for n in expected]  # network order, whatever the files' order
    else:
        ordered = list(targets.values())
    for piece in tied:
        if piece.target not in targets:
            raise CheckpointError(f"'{piece.source}' is tied to '{piece.target}', which the checkpoint lacks")
    return Plan(ordered, tied, ignored, source, family)


def build_target(target: Target, arrays: list, config: Optional[GLMConfig]) -> np.ndarray:
    """Build mindglm tensor `target` from the arrays of its pieces (same order as target.pieces)."""
    if len(arrays) == 1:
        return _transform(target.pieces[0], arrays[0], config)
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) > 1:
        raise CheckpointError(f"the pieces of '{target.name}' ({', '.join(p.source for p in target.pieces)}) "
                              f"have different dtypes {sorted(map(str, dtypes))}")
    return np.concatenate(arrays, axis=0)


# ---------------------------------------------------------------------------------- to THUDM

_TO_THUDM_V2 = {
    "embedding.weight": "transformer.embedding.word_embeddings.weight",
    "input_norm": "input_layernorm", "attention.qkv": "self_attention.query_key_value",
    "attention.dense": "self_attention.dense", "post_attention_norm": "post_attention_layernorm",
    "mlp.up": "mlp.dense_h_to_4h", "mlp.down": "mlp.dense_4h_to_h",
    "final_norm": "transformer.encoder.final_layernorm", "output.weight": "transformer.output_layer.weight",
    "output.weight_scale": "transformer.output_layer.weight_scale",
}
_TO_THUDM_V1 = dict(_TO_THUDM_V2, **{
    "embedding.weight": "transformer.word_embeddings.weight", "attention.qkv": "attention.query_key_value",
    "attention.dense": "attention.dense", "final_norm": "transformer.final_layernorm",
})


def thudm_name(name: str, family: str) -> str:
    """THUDM's name for mindglm tensor `name` in `family`."""
    v1 = _table_family(family) == "chatglm"
    table = _TO_THUDM_V1 if v1 else _TO_THUDM_V2
    if name in table:
        return table[name]
    match = re.fullmatch(r"layers\.(?P<layer>\d+)\.(?P<module>[a-z_.]+)" + _WB, name) \
        or re.fullmatch(r"(?P<module>final_norm)" + _WB, name)
    if match is None or match["module"] not in table:
        raise CheckpointError(f"'{name}' is not a mindglm parameter name")
    module = table[match["module"]]
    if match["module"] == "final_norm":
        return f"{module}.{match['wb']}"
    prefix = "transformer.layers." if v1 else "transformer.encoder.layers."
    return f"{prefix}{match['layer']}.{module}.{match['wb']}"


def to_thudm(name: str, array: np.ndarray, config: Optional[GLMConfig] = None,
             family: Optional[str] = None) -> list:
    """Map one mindglm tensor back to [(thudm_name, array)] (v1 qkv re-interleaved per head).

    `config` is required for ChatGLM-6B's qkv (head count); otherwise `family` alone will do.
    v1's output layer is tied to the embedding, so no `lm_head.weight` is written.
    """
    family = config.family if config is not None else family
    if family is None:
        raise ValueError("to_thudm needs a config or a family")
    if config is not None:
        expected = expected_shapes(config)
        if name not in expected:
            raise CheckpointError(f"'{name}' is not a parameter of this config's network ({_config_summary(config)})")
        check_shape(name, array.shape, expected[name], config)
    out = thudm_name(name, family)
    if _table_family(family) == "chatglm" and ".attention.qkv." in name:
        if config is None:
            raise CheckpointError(f"'{name}': writing ChatGLM-6B's qkv layout needs the model's config.json "
                                  "(pass --config)")
        array = qkv_grouped_to_v1(array, config.num_attention_heads, config.kv_channels)
    return [(out, array)]
