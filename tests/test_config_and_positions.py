"""GLMConfig parsing/validation and the host-side position / mask rules of each family."""
import json

import numpy as np
import pytest

from conftest import model_dir
from mindglm.config import ConfigError, GLMConfig
from mindglm.models import glm, glm2


def test_reads_each_family_from_thudm_config():
    v1 = GLMConfig.from_thudm(model_dir("chatglm-tiny"))
    v2 = GLMConfig.from_thudm(model_dir("chatglm2-tiny"))
    v3 = GLMConfig.from_thudm(model_dir("chatglm3-tiny"))
    assert (v1.family, v2.family, v3.family) == ("chatglm", "chatglm2", "chatglm3")
    assert v1.ffn_hidden_size == 256 and v1.kv_heads == 4 and v1.tie_word_embeddings and not v1.rmsnorm
    assert v1.gmask_token_id == 1001 and v1.mask_token_id == 1000 and v1.bos_token_id == 1004
    assert v2.kv_heads == 2 and v2.vocab_size == 1000 and v2.ffn_hidden_size == 160
    assert v3.kv_heads == 1 and v3.effective_rope_scaling == "base" and v2.effective_rope_scaling == "position"


def _write(tmp_path, raw):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return str(tmp_path)


def _raw(name="chatglm2-tiny"):
    with open(f"{model_dir(name)}/config.json") as fh:
        return json.load(fh)


def test_unknown_key_is_named(tmp_path):
    raw = _raw()
    raw["num_layerz"] = 3
    with pytest.raises(ConfigError, match="num_layerz"):
        GLMConfig.from_thudm(_write(tmp_path, raw))


@pytest.mark.parametrize("key,value", [("num_layers", "2"), ("rmsnorm", 1), ("layernorm_epsilon", "1e-5"),
                                       ("hidden_size", 64.0), ("eos_token_id", [2, "x"])])
def test_ill_typed_key_is_named(tmp_path, key, value):
    raw = _raw()
    raw[key] = value
    with pytest.raises(ConfigError, match=key):
        GLMConfig.from_thudm(_write(tmp_path, raw))


def test_missing_and_broken_config_files(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        GLMConfig.from_thudm(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        GLMConfig.from_thudm(str(tmp_path))


def test_ptuning_and_quantized_configs_are_refused(tmp_path):
    raw = _raw()
    raw["pre_seq_len"] = 128
    with pytest.raises(ConfigError, match="P-Tuning"):
        GLMConfig.from_thudm(_write(tmp_path, raw))


def test_from_dict_validates():
    with pytest.raises(ConfigError, match="family"):
        GLMConfig.from_dict({"family": "glm4"})
    with pytest.raises(ConfigError, match="multiple"):
        GLMConfig.from_dict({"num_attention_heads": 6, "multi_query_group_num": 4})
    assert GLMConfig.from_dict({"rope_ratio": 16}).rope_ratio == 16


def test_32k_rope_variants():
    """chatglm2-6b-32k divides positions by rope_ratio; chatglm3-6b-32k multiplies the base."""
    v2 = GLMConfig(family="chatglm2", kv_channels=8, seq_length=64, rope_ratio=16.0)
    v3 = GLMConfig(family="chatglm3", kv_channels=8, seq_length=64, rope_ratio=50.0)
    angles2, angles3 = glm2.rotary_angles(v2), glm2.rotary_angles(v3)
    base_freq = 1.0 / 10000 ** (np.arange(0, 4, 2) / 4)
    np.testing.assert_allclose(angles2[32, ::2], 32 / 16 * base_freq, rtol=1e-6)
    np.testing.assert_allclose(angles3[32, ::2], 32 / 500000 ** (np.arange(0, 4, 2) / 4), rtol=1e-6)
    override = GLMConfig(family="chatglm3", kv_channels=8, seq_length=64, rope_ratio=16.0, rope_scaling="position")
    np.testing.assert_allclose(glm2.rotary_angles(override), angles2)


# ------------------------------------------------------------------ positions
V1 = GLMConfig(family="chatglm", vocab_size=1024, hidden_size=64, num_layers=2, num_attention_heads=4, kv_channels=16,
               multi_query_group_num=4, ffn_hidden_size=256, seq_length=64, bos_token_id=1004, eos_token_id=1005,
               pad_token_id=3, mask_token_id=1000, gmask_token_id=1001, tie_word_embeddings=True, rmsnorm=False)


def test_v1_gmask_positions():
    ids = np.array([[11, 12, 13, 1001, 1004, 20, 21]])
    positions, prefix = glm.prepare_positions(V1, ids)
    assert positions[0, 0].tolist() == [0, 1, 2, 3, 3, 3, 3]
    assert positions[0, 1].tolist() == [0, 0, 0, 0, 1, 2, 3]
    assert prefix.tolist() == [4]


def test_v1_mask_in_the_middle_and_gmask_priority():
    ids = np.array([[11, 1000, 13, 14, 1004, 20]])
    positions, _ = glm.prepare_positions(V1, ids)
    assert positions[0, 0].tolist() == [0, 1, 2, 3, 1, 1]
    both = np.array([[11, 1000, 1001, 1004]])
    assert glm.prepare_positions(V1, both)[0][0, 0].tolist() == [0, 1, 2, 2]   # [gMASK] wins, as in the model


def test_v1_left_padded_batch():
    ids = np.array([[3, 3, 11, 1001, 1004, 20], [11, 12, 13, 1001, 1004, 20]])
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    positions, prefix = glm.prepare_positions(V1, ids, mask)
    assert positions[0, 0].tolist() == [0, 0, 0, 1, 1, 1] and positions[0, 1].tolist() == [0, 0, 0, 0, 1, 2]
    assert positions[1, 0].tolist() == [0, 1, 2, 3, 3, 3] and positions[1, 1].tolist() == [0, 0, 0, 0, 1, 2]
    assert prefix.tolist() == [4, 4]   # slot index where each row's generation part starts


def test_v1_attention_mask_is_bidirectional_over_the_context():
    from mindspore import Tensor
    import mindspore as ms
    from mindglm.models.layers import attention_mask, mask_inputs
    key_valid = np.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    query_index = np.array([np.arange(5), [1, 2, 3, 3, 3]])   # per row
    allowed = attention_mask(*(Tensor(a, ms.int32) for a in mask_inputs(key_valid, query_index, [3, 2])))
    expected = np.array([[[0, 1, 1, 0, 0],   # pad query: only real context keys (never NaN)
                          [0, 1, 1, 0, 0],
                          [0, 1, 1, 0, 0],
                          [0, 1, 1, 1, 0],
                          [0, 1, 1, 1, 1]],
                         [[1, 1, 0, 0, 0],   # a row whose queries sit at slots 1, 2, 3, 3, 3
                          [1, 1, 1, 0, 0],
                          [1, 1, 1, 1, 0],
                          [1, 1, 1, 1, 0],
                          [1, 1, 1, 1, 0]]], bool)
    np.testing.assert_array_equal(allowed.asnumpy()[:, 0], expected)


def test_packed_row_queries_see_only_their_own_sequence():
    """Two sequences back to back on one key axis (a packed prefill): each query's range is its own."""
    from mindspore import Tensor
    import mindspore as ms
    from mindglm.models.layers import attention_mask
    key_valid = np.array([[1, 1, 1, 1, 1, 0]])
    first = np.array([[0, 0, 2, 2, 2, 0]])           # sequence A: keys 0-1, B: keys 2-4, then padding
    last = np.array([[0, 1, 2, 3, 4, 4]])
    allowed = attention_mask(*(Tensor(a, ms.int32) for a in (key_valid, first, last))).asnumpy()[0, 0]
    expected = np.array([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0],
                         [0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]], bool)
    np.testing.assert_array_equal(allowed, expected)


def test_v2_positions_from_attention_mask():
    ids = np.array([[0, 0, 5, 6, 7], [4, 5, 6, 7, 8]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions, prefix = glm2.prepare_positions(None, ids, mask)
    assert positions[:, 0].tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert prefix.tolist() == [0, 0]


SWITCHES = [{"rmsnorm": False}, {"post_layer_norm": False}, {"add_bias_linear": True},
            {"rmsnorm": False, "post_layer_norm": False, "tie_word_embeddings": True}]


@pytest.mark.parametrize("switches", SWITCHES + [{"rmsnorm": True}, {"add_bias_linear": False}],
                         ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("family", ["chatglm", "chatglm3"])
def test_network_switches_are_honoured_by_the_builders(family, switches):
    """The network built is the one the checkpoint schema (expected_shapes) describes, switch for switch."""
    from mindglm.checkpoint import expected_shapes
    from mindglm.models import family_module
    extra = dict(bos_token_id=5, mask_token_id=6, gmask_token_id=7, multi_query_group_num=2) if family == "chatglm" \
        else {}
    config = GLMConfig(family=family, vocab_size=64, hidden_size=32, num_layers=1, num_attention_heads=2,
                       kv_channels=16, ffn_hidden_size=48, seq_length=32, **{**extra, **switches})
    network = family_module(config).build_network(config)
    built = {p.name: tuple(p.shape) for p in network.get_parameters() if ".cache." not in p.name}
    assert built == expected_shapes(config)
    assert ("layers.0.input_norm.bias" in built) == (not config.rmsnorm)
    assert ("final_norm.weight" in built) == config.post_layer_norm
    assert ("layers.0.mlp.down.bias" in built) == config.add_bias_linear


def test_family_network_defaults_and_the_v1_residual_rule():
    v1 = GLMConfig(family="chatglm", bos_token_id=5, mask_token_id=6, gmask_token_id=7, multi_query_group_num=32)
    assert (v1.rmsnorm, v1.add_bias_linear, v1.tie_word_embeddings, v1.apply_residual_connection_post_layernorm) == \
        (False, True, True, True)
    v3 = GLMConfig(family="chatglm3")
    assert (v3.rmsnorm, v3.add_bias_linear, v3.tie_word_embeddings, v3.apply_residual_connection_post_layernorm) == \
        (True, False, False, False)
    with pytest.raises(ConfigError, match="ChatGLM-6B always takes its residuals from the norm outputs"):
        GLMConfig(family="chatglm", bos_token_id=5, mask_token_id=6, gmask_token_id=7, multi_query_group_num=32,
                  apply_residual_connection_post_layernorm=False)
