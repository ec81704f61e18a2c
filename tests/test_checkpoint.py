"""Name maps and layout transforms of mindglm.checkpoint (pure numpy, no files but configs/indexes)."""
import json
import os

import numpy as np
import pytest

from mindglm.checkpoint import (CheckpointError, build_target, check_shape, detect_family, detect_source,
                                expected_shapes, map_name, plan_to_mindglm, qkv_grouped_to_v1,
                                qkv_v1_to_grouped, thudm_name, to_mindglm, to_thudm)
from mindglm.config import GLMConfig

MODELS = os.path.join(os.path.dirname(__file__), "fixtures", "models")


def config_of(model):
    return GLMConfig.from_thudm(os.path.join(MODELS, model))


def index_names(model):
    folder = os.path.join(MODELS, model)
    index = next(f for f in os.listdir(folder) if f.endswith(".index.json"))
    with open(os.path.join(folder, index)) as fh:
        return list(json.load(fh)["weight_map"])


def random_like_thudm(model, rng):
    """THUDM name -> random float32 array of the shape config.json implies (inverse-mapped)."""
    config = config_of(model)
    shapes = expected_shapes(config)
    arrays = {}
    for name in index_names(model):
        piece = map_name(name, config.family, "thudm")
        if piece.kind == "ignore":
            arrays[name] = rng.standard_normal(8).astype(np.float32)
        else:
            arrays[name] = rng.standard_normal(shapes[piece.target]).astype(np.float32)
    return config, arrays


@pytest.mark.parametrize("model,count", [("chatglm-tiny", 2 + 2 * 12 + 2 - 1), ("chatglm2-tiny", 1 + 2 * 7 + 2),
                                         ("chatglm3-tiny", 1 + 2 * 7 + 2)])
def test_expected_shapes_per_family(model, count):
    config = config_of(model)
    shapes = expected_shapes(config)
    assert len(shapes) == count
    h = config.hidden_size
    assert shapes["embedding.weight"] == (config.vocab_size, h)
    if config.family == "chatglm":
        assert "output.weight" not in shapes
        assert shapes["layers.0.attention.qkv.weight"] == (3 * h, h)
        assert shapes["layers.1.mlp.up.bias"] == (config.ffn_hidden_size,)
        assert shapes["final_norm.bias"] == (h,)
    else:
        q, kv = config.num_attention_heads * 16, config.multi_query_group_num * 16
        assert shapes["layers.1.attention.qkv.weight"] == (q + 2 * kv, h)
        assert shapes["layers.0.mlp.up.weight"] == (2 * config.ffn_hidden_size, h)
        assert shapes["layers.0.mlp.down.weight"] == (h, config.ffn_hidden_size)
        assert shapes["output.weight"] == (config.vocab_size, h)
        assert "layers.0.attention.dense.bias" not in shapes


@pytest.mark.parametrize("model", ["chatglm-tiny", "chatglm2-tiny", "chatglm3-tiny"])
def test_every_fixture_name_maps_and_covers_the_network(model):
    config, arrays = random_like_thudm(model, np.random.default_rng(0))
    produced = {}
    for name, array in arrays.items():
        for target, out in to_mindglm(name, array, config):
            assert target not in produced
            produced[target] = out
    assert set(produced) == set(expected_shapes(config))
    assert detect_source(arrays) == "thudm"
    assert detect_family(arrays) == config.family.replace("chatglm3", "chatglm2")


@pytest.mark.parametrize("model", ["chatglm-tiny", "chatglm2-tiny"])
def test_to_thudm_inverts_to_mindglm(model):
    config, arrays = random_like_thudm(model, np.random.default_rng(1))
    for name, array in arrays.items():
        for target, out in to_mindglm(name, array, config):
            (back_name, back), = to_thudm(target, out, config)
            assert back_name == name and np.array_equal(back, array)
            assert thudm_name(target, config.family) == name


def test_v1_qkv_interleave_is_regrouped():
    heads, d, hidden = 4, 3, 5
    # THUDM v1 rows: head h, then q/k/v, then d; encode (h, which, i) in the values.
    rows = [(h, which, i) for h in range(heads) for which in range(3) for i in range(d)]
    weight = np.array([[100 * h + 10 * which + i] * hidden for h, which, i in rows], np.float32)
    grouped = qkv_v1_to_grouped(weight, heads, d)
    expected = [100 * h + 10 * which + i for which in range(3) for h in range(heads) for i in range(d)]
    assert grouped[:, 0].tolist() == expected
    assert np.array_equal(qkv_grouped_to_v1(grouped, heads, d), weight)
    bias = weight[:, 0].copy()
    assert qkv_v1_to_grouped(bias, heads, d).tolist() == expected
    assert np.array_equal(qkv_grouped_to_v1(qkv_v1_to_grouped(bias, heads, d), heads, d), bias)


def test_v1_qkv_through_to_mindglm_uses_config_heads():
    config = config_of("chatglm-tiny")
    heads, d, h = config.num_attention_heads, config.kv_channels, config.hidden_size
    weight = np.arange(3 * h * h, dtype=np.float32).reshape(3 * h, h)
    (name, out), = to_mindglm("transformer.layers.1.attention.query_key_value.weight", weight, config)
    assert name == "layers.1.attention.qkv.weight"
    # q of head 1 sits right after q of head 0 in mindglm; in THUDM it starts at row 3*d.
    assert np.array_equal(out[d:2 * d], weight[3 * d:4 * d])
    assert np.array_equal(out[heads * d:heads * d + d], weight[d:2 * d])  # k of head 0


def test_ignored_and_tied_tensors_map_to_nothing():
    v1, v2 = config_of("chatglm-tiny"), config_of("chatglm2-tiny")
    assert to_mindglm("transformer.rotary_pos_emb.inv_freq", np.ones(8, np.float32), v2) == []
    assert to_mindglm("transformer.layers.0.attention.rotary_emb.inv_freq", np.ones(8, np.float32), v1) == []
    assert to_mindglm("lm_head.weight", np.ones((1024, 64), np.float16), v1) == []
    assert map_name("lm_head.weight", "chatglm").kind == "tied"


def test_unknown_names_and_extra_layers_are_named_in_errors():
    v2 = config_of("chatglm2-tiny")
    with pytest.raises(CheckpointError, match="transformer.encoder.layers.0.self_attention.rotary.weight"):
        to_mindglm("transformer.encoder.layers.0.self_attention.rotary.weight", np.ones(2), v2)
    with pytest.raises(CheckpointError, match="layer 7 but config.json has num_layers=2"):
        to_mindglm("transformer.encoder.layers.7.input_layernorm.weight", np.ones(64, np.float32), v2)
    with pytest.raises(CheckpointError, match="lm_head.weight"):  # v2 has no tied lm_head
        to_mindglm("lm_head.weight", np.ones((1000, 64)), v2)
    with pytest.raises(CheckpointError, match="embedding_weight"):  # MindFormers name in THUDM mode
        to_mindglm("transformer.embedding.embedding_weight", np.ones((1000, 64)), v2, source="thudm")


def test_shape_mismatch_names_tensor_shapes_and_config():
    v2 = config_of("chatglm2-tiny")
    with pytest.raises(CheckpointError) as err:
        to_mindglm("transformer.encoder.layers.0.mlp.dense_h_to_4h.weight", np.ones((300, 64)), v2)
    message = str(err.value)
    for part in ("transformer.encoder.layers.0.mlp.dense_h_to_4h.weight", "(300, 64)", "(320, 64)",
                 "config.json", "ffn_hidden_size=160"):
        assert part in message
    check_shape("x", (2, 3), (2, 3), v2)  # no error


def test_mindformers_names():
    v1, v2 = config_of("chatglm-tiny"), config_of("chatglm2-tiny")
    assert map_name("transformer.embedding.embedding_weight", "chatglm3", "mindformers").target == "embedding.weight"
    assert map_name("transformer.embedding.embedding_table", "chatglm2", "mindformers").target == "embedding.weight"
    assert map_name("transformer.encoder.layers.1.self_attention.dense.weight", "chatglm2",
                    "mindformers").target == "layers.1.attention.dense.weight"
    assert map_name("transformer.word_embeddings.embedding_table", "chatglm", "mindformers").target == \
        "embedding.weight"
    assert map_name("transformer.layers.0.input_layernorm.gamma", "chatglm", "mindformers").target == \
        "layers.0.input_norm.weight"
    assert map_name("transformer.final_layernorm.beta", "chatglm", "mindformers").target == "final_norm.bias"
    assert map_name("adam_m.transformer.output_layer.weight", "chatglm2", "mindformers").kind == "ignore"
    assert map_name("global_step", "chatglm2", "mindformers").kind == "ignore"
    (name, _), = to_mindglm("transformer.embedding.embedding_weight", np.ones((1000, 64)), v2)  # auto source
    assert name == "embedding.weight"
    wk = map_name("transformer.encoder.layers.0.self_attention.wk.bias", "chatglm2", "mindformers")
    assert (wk.target, wk.kind, wk.part, wk.parts) == ("layers.0.attention.qkv.bias", "part", 1, 3)
    assert detect_source(["transformer.embedding.embedding_weight", "transformer.output_layer.weight"]) == \
        "mindformers"
    assert detect_source(["transformer.layers.0.input_layernorm.gamma"]) == "mindformers"
    assert detect_source(["embedding.weight", "layers.0.input_norm.weight"]) == "mindglm"
    with pytest.raises(CheckpointError, match="siblings"):
        to_mindglm("transformer.encoder.layers.0.self_attention.wq.weight", np.ones((64, 64)), v2, "mindformers")
    (name, _), = to_mindglm("transformer.layers.0.post_attention_layernorm.beta", np.ones(64), v1, "mindformers")
    assert name == "layers.0.post_attention_norm.bias"


def test_plan_fuses_mindformers_pieces_like_thudm():
    config = config_of("chatglm2-tiny")
    rng = np.random.default_rng(2)
    q, kv, ffn, h = 64, 32, config.ffn_hidden_size, config.hidden_size
    pieces = {"transformer.encoder.layers.0.self_attention.wv.weight": rng.standard_normal((kv, h)),
              "transformer.encoder.layers.0.self_attention.wq.weight": rng.standard_normal((q, h)),
              "transformer.encoder.layers.0.self_attention.wk.weight": rng.standard_normal((kv, h)),
              "transformer.encoder.layers.0.mlp.dense_left.weight": rng.standard_normal((ffn, h)),
              "transformer.encoder.layers.0.mlp.dense_right.weight": rng.standard_normal((ffn, h))}
    plan = plan_to_mindglm({n: a.shape for n, a in pieces.items()}, None, family="chatglm2")
    assert plan.source == "mindformers"
    built = {t.name: build_target(t, [pieces[p.source] for p in t.pieces], None) for t in plan.targets}
    p = "transformer.encoder.layers.0."
    assert np.array_equal(built["layers.0.attention.qkv.weight"], np.concatenate(
        [pieces[p + "self_attention.wq.weight"], pieces[p + "self_attention.wk.weight"],
         pieces[p + "self_attention.wv.weight"]]))
    assert np.array_equal(built["layers.0.mlp.up.weight"], np.concatenate(
        [pieces[p + "mlp.dense_left.weight"], pieces[p + "mlp.dense_right.weight"]]))
    assert [t.shape for t in plan.targets] == [(q + 2 * kv, h), (2 * ffn, h)]


def test_plan_checks_pieces_shapes_and_completeness():
    config = config_of("chatglm2-tiny")
    shapes = {n: s for n, s in _thudm_shapes(config).items()}
    plan = plan_to_mindglm(shapes, config)
    assert [t.name for t in plan.targets] == list(expected_shapes(config))
    assert plan.ignored == ["transformer.rotary_pos_emb.inv_freq"]

    missing = dict(shapes)
    del missing["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.down\.weight.*dense_4h_to_h"):
        plan_to_mindglm(missing, config)

    split = {n: s for n, s in shapes.items() if "layers.0.self_attention.query_key_value.weight" not in n}
    split["transformer.encoder.layers.0.self_attention.wq.weight"] = (64, 64)
    split["transformer.encoder.layers.0.self_attention.wk.weight"] = (32, 64)
    with pytest.raises(CheckpointError, match="only has .*wq.weight.*wk.weight"):
        plan_to_mindglm(split, config, source="mindformers")
    split["transformer.encoder.layers.0.self_attention.wv.weight"] = (16, 64)
    with pytest.raises(CheckpointError, match=r"wv.weight.*\(16, 64\).*\(32, 64\)"):
        plan_to_mindglm(split, config, source="mindformers")

    both = dict(shapes, **{"transformer.embedding.embedding_weight": (1000, 64)})
    with pytest.raises(CheckpointError, match="both provide mindglm 'embedding.weight'"):
        plan_to_mindglm(both, config, source="mindformers")


def _thudm_shapes(config):
    shapes = {"transformer.rotary_pos_emb.inv_freq": (8,)}
    for name, shape in expected_shapes(config).items():
        shapes[thudm_name(name, config.family)] = shape
    return shapes


def test_to_thudm_without_config_for_v2_but_not_v1_qkv():
    out = to_thudm("layers.3.mlp.up.weight", np.ones((4, 2)), family="chatglm3")
    assert out[0][0] == "transformer.encoder.layers.3.mlp.dense_h_to_4h.weight"
    assert thudm_name("final_norm.bias", "chatglm") == "transformer.final_layernorm.bias"
    with pytest.raises(CheckpointError, match="--config"):
        to_thudm("layers.0.attention.qkv.weight", np.ones((6, 2)), family="chatglm")
    with pytest.raises(CheckpointError, match="not a mindglm parameter"):
        thudm_name("layers.0.attention.rotary.weight", "chatglm2")
