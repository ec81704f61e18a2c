"""An independent float64 numpy forward pass of the three GLM families, read off THUDM's
modeling_chatglm.py files (chatglm-6b, chatglm2-6b, chatglm3-6b), plus random THUDM-format
checkpoints to run it on.

It shares no code with mindglm: it takes THUDM parameter names and layouts (ChatGLM-6B's per-head
interleaved qkv rows, ChatGLM2/3's [gate | up] rows) and computes every op in float64, so it is
the yardstick for mindglm's float32 network on shapes the golden fixtures do not cover.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

# THUDM's ChatGLM-6B GLMBlock never receives num_layers, so its residual alpha is that of 28 layers.
V1_ALPHA = math.sqrt(2 * 28)
# Special ids of the random ChatGLM-6B checkpoints (numbered after the plain vocabulary).
V1_SPECIALS = {"mask_token_id": 0, "gmask_token_id": 1, "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 4}


# ---------------------------------------------------------------------------------- random checkpoints
def random_checkpoint(family: str, layers: int, heads: int, head_dim: int, ffn: int, vocab: int,
                      kv_groups: int = 1, seed: int = 0, seq_length: int = 64, gain: float = 2.0,
                      rope_ratio: float = 1.0) -> tuple:
    """(THUDM config.json dict, {THUDM name: float32 array}) of a random model of that shape.

    Matrices are N(0, gain^2 / fan_in), the embedding N(0, 0.2^2), norms near 1. The golden
    fixtures use gain ~4, where attention is nearly one-hot (scores up to ~70) and any float32
    implementation (mindglm, torch, numpy) drifts from float64 by ~1e-4 after 3 ChatGLM-6B layers;
    gain 2 keeps the network well conditioned, so the comparison measures the implementation.
    rope_ratio (ChatGLM2/3): the -32k models' context stretch, applied as each family does.
    """
    rng = np.random.default_rng(seed)
    hidden = heads * head_dim

    def matrix(rows, cols):
        return (rng.standard_normal((rows, cols)) * (gain / math.sqrt(cols))).astype(np.float32)

    def vector(size, center=0.0, spread=0.1):
        return (center + spread * rng.standard_normal(size)).astype(np.float32)

    tensors = {}
    if family == "chatglm":
        config = {"_name_or_path": "THUDM/chatglm-6b", "vocab_size": vocab, "hidden_size": hidden,
                  "num_layers": layers, "num_attention_heads": heads, "inner_hidden_size": ffn,
                  "max_sequence_length": seq_length, "layernorm_epsilon": 1e-5, "position_encoding_2d": True,
                  **V1_SPECIALS}
        tensors["transformer.word_embeddings.weight"] = (0.2 * rng.standard_normal((vocab, hidden))).astype(np.float32)
        for i in range(layers):
            p = f"transformer.layers.{i}."
            for norm in ("input_layernorm", "post_attention_layernorm"):
                tensors[p + norm + ".weight"], tensors[p + norm + ".bias"] = vector(hidden, 1.0), vector(hidden)
            for name, rows, cols in (("attention.query_key_value", 3 * hidden, hidden),
                                     ("attention.dense", hidden, hidden),
                                     ("mlp.dense_h_to_4h", ffn, hidden), ("mlp.dense_4h_to_h", hidden, ffn)):
                tensors[p + name + ".weight"], tensors[p + name + ".bias"] = matrix(rows, cols), vector(rows)
        tensors["transformer.final_layernorm.weight"] = vector(hidden, 1.0)
        tensors["transformer.final_layernorm.bias"] = vector(hidden)
        tensors["lm_head.weight"] = tensors["transformer.word_embeddings.weight"]
        return config, tensors
    name = "THUDM/chatglm3-6b" if family == "chatglm3" else "THUDM/chatglm2-6b"
    config = {"_name_or_path": name, "padded_vocab_size": vocab, "hidden_size": hidden, "num_layers": layers,
              "num_attention_heads": heads, "kv_channels": head_dim, "multi_query_group_num": kv_groups,
              "ffn_hidden_size": ffn, "seq_length": seq_length, "layernorm_epsilon": 1e-5, "rmsnorm": True,
              "add_qkv_bias": True, "add_bias_linear": False, "post_layer_norm": True,
              "apply_residual_connection_post_layernorm": False, "tie_word_embeddings": False,
              "multi_query_attention": True, "eos_token_id": 2, "pad_token_id": 0, "rope_ratio": rope_ratio}
    tensors["transformer.embedding.word_embeddings.weight"] = (0.2 * rng.standard_normal((vocab, hidden))).astype(np.float32)
    qkv_rows = (heads + 2 * kv_groups) * head_dim
    for i in range(layers):
        p = f"transformer.encoder.layers.{i}."
        tensors[p + "input_layernorm.weight"] = vector(hidden, 1.0)
        tensors[p + "self_attention.query_key_value.weight"] = matrix(qkv_rows, hidden)
        tensors[p + "self_attention.query_key_value.bias"] = vector(qkv_rows)
        tensors[p + "self_attention.dense.weight"] = matrix(hidden, hidden)
        tensors[p + "post_attention_layernorm.weight"] = vector(hidden, 1.0)
        tensors[p + "mlp.dense_h_to_4h.weight"] = matrix(2 * ffn, hidden)
        tensors[p + "mlp.dense_4h_to_h.weight"] = matrix(hidden, ffn)
    tensors["transformer.encoder.final_layernorm.weight"] = vector(hidden, 1.0)
    tensors["transformer.output_layer.weight"] = matrix(vocab, hidden)
    return config, tensors


def write_checkpoint(directory: str, config: dict, tensors: dict) -> str:
    """Write a THUDM model dir (config.json + model.safetensors, float32) without mindglm's writers."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(os.path.join(directory, "model.safetensors"), "wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))
    return directory


# ---------------------------------------------------------------------------------- float64 forward
def _layer_norm(x, weight, bias, eps):
    centered = x - x.mean(-1, keepdims=True)
    return centered / np.sqrt((centered ** 2).mean(-1, keepdims=True) + eps) * weight + bias


def _rms_norm(x, weight, eps):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * weight


def _softmax(scores):
    scores = scores - scores.max(-1, keepdims=True)
    e = np.exp(scores)
    return e / e.sum(-1, keepdims=True)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _attend(q, k, v, allowed):
    """q [heads, S, d], k/v [heads, S, d], allowed [S, S] -> [S, heads * d]."""
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1])
    probs = _softmax(np.where(allowed, scores, -np.inf))
    return (probs @ v).transpose(1, 0, 2).reshape(q.shape[1], -1)


def _rotate_half(x, cos, sin):
    half = x.shape[-1] // 2
    turned = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + turned * sin


def v1_positions(ids: list, config: dict) -> tuple:
    """(position ids, block position ids, context length) as THUDM's ChatGLM-6B modeling derives them."""
    mask = config["gmask_token_id"] if config["gmask_token_id"] in ids else config["mask_token_id"]
    context = ids.index(config["bos_token_id"])
    position = np.arange(len(ids))
    position[context:] = ids.index(mask)
    block = np.concatenate([np.zeros(context, np.int64), np.arange(1, len(ids) - context + 1)])
    return position, block, context


def logits_v1(config: dict, tensors: dict, ids: list, trace: list = None) -> np.ndarray:
    """ChatGLM-6B logits [S, vocab] in float64 for one unpadded prompt (which holds a mask token and <sop>).

    `trace`, a list, receives the hidden states after each layer (to find where an implementation drifts).
    """
    w = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    d, eps, seq = hidden // heads, config["layernorm_epsilon"], len(ids)
    position, block, context = v1_positions(ids, config)
    quarter = d // 2  # each half of a head is rotated with its own position channel
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, quarter, 2) / quarter)

    def table(pos):
        angles = np.outer(pos, inv_freq)
        angles = np.concatenate([angles, angles], -1)
        return np.cos(angles)[None], np.sin(angles)[None]

    (cos1, sin1), (cos2, sin2) = table(position), table(block)
    allowed = np.tril(np.ones((seq, seq), bool))
    allowed[:, :context] = True
    h = w["transformer.word_embeddings.weight"][ids]
    for i in range(config["num_layers"]):
        p = f"transformer.layers.{i}."
        x = _layer_norm(h, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], eps)
        qkv = x @ w[p + "attention.query_key_value.weight"].T + w[p + "attention.query_key_value.bias"]
        qkv = qkv.reshape(seq, heads, 3 * d).transpose(1, 0, 2)  # per-head interleaved [q | k | v]
        q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
        q = np.concatenate([_rotate_half(q[..., :quarter], cos1, sin1), _rotate_half(q[..., quarter:], cos2, sin2)], -1)
        k = np.concatenate([_rotate_half(k[..., :quarter], cos1, sin1), _rotate_half(k[..., quarter:], cos2, sin2)], -1)
        attn = _attend(q, k, v, allowed) @ w[p + "attention.dense.weight"].T + w[p + "attention.dense.bias"]
        h = x * V1_ALPHA + attn
        x = _layer_norm(h, w[p + "post_attention_layernorm.weight"], w[p + "post_attention_layernorm.bias"], eps)
        up = _gelu_tanh(x @ w[p + "mlp.dense_h_to_4h.weight"].T + w[p + "mlp.dense_h_to_4h.bias"])
        h = x * V1_ALPHA + up @ w[p + "mlp.dense_4h_to_h.weight"].T + w[p + "mlp.dense_4h_to_h.bias"]
        if trace is not None:
            trace.append(h)
    h = _layer_norm(h, w["transformer.final_layernorm.weight"], w["transformer.final_layernorm.bias"], eps)
    return h @ w["transformer.word_embeddings.weight"].T


def logits_v2(config: dict, tensors: dict, ids: list, trace: list = None) -> np.ndarray:
    """ChatGLM2/3 logits [S, vocab] in float64 for one unpadded prompt (positions 0..S-1); `trace` as in
    logits_v1."""
    w = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
    heads, groups, d = config["num_attention_heads"], config["multi_query_group_num"], config["kv_channels"]
    eps, seq = config["layernorm_epsilon"], len(ids)
    rotary = d // 2  # ChatGLM2/3 rotate the first half of each head, in interleaved pairs
    base, ratio = 10000.0, float(config.get("rope_ratio", 1.0))
    inv_freq = 1.0 / (base * (ratio if "chatglm3" in config["_name_or_path"] else 1.0)) ** (
        np.arange(0, rotary, 2) / rotary)
    positions = np.arange(seq) / (1.0 if "chatglm3" in config["_name_or_path"] else ratio)
    angles = np.outer(positions, inv_freq)[None]  # [1, S, rotary / 2]
    cos, sin = np.cos(angles), np.sin(angles)

    def rope(x):
        pairs = x[..., :rotary].reshape(x.shape[:-1] + (rotary // 2, 2))
        x0, x1 = pairs[..., 0], pairs[..., 1]
        turned = np.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1).reshape(x.shape[:-1] + (rotary,))
        return np.concatenate([turned, x[..., rotary:]], -1)

    allowed = np.tril(np.ones((seq, seq), bool))
    h = w["transformer.embedding.word_embeddings.weight"][ids]
    for i in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        x = _rms_norm(h, w[p + "input_layernorm.weight"], eps)
        qkv = x @ w[p + "self_attention.query_key_value.weight"].T + w[p + "self_attention.query_key_value.bias"]
        q = qkv[:, : heads * d].reshape(seq, heads, d).transpose(1, 0, 2)
        k = qkv[:, heads * d: (heads + groups) * d].reshape(seq, groups, d).transpose(1, 0, 2)
        v = qkv[:, (heads + groups) * d:].reshape(seq, groups, d).transpose(1, 0, 2)
        share = heads // groups  # consecutive query heads share one key/value group
        k, v = np.repeat(rope(k), share, axis=0), np.repeat(v, share, axis=0)
        h = h + _attend(rope(q), k, v, allowed) @ w[p + "self_attention.dense.weight"].T
        x = _rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = np.split(x @ w[p + "mlp.dense_h_to_4h.weight"].T, 2, axis=-1)
        h = h + (gate / (1.0 + np.exp(-gate)) * up) @ w[p + "mlp.dense_4h_to_h.weight"].T
        if trace is not None:
            trace.append(h)
    h = _rms_norm(h, w["transformer.encoder.final_layernorm.weight"], eps)
    return h @ w["transformer.output_layer.weight"].T


def reference_logits(config: dict, tensors: dict, ids: list, trace: list = None) -> np.ndarray:
    """Float64 logits [S, vocab] of the family the THUDM config describes."""
    return (logits_v1 if config.get("position_encoding_2d") else logits_v2)(config, tensors, list(ids), trace)
