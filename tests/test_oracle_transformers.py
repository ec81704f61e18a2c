"""A second oracle: transformers' GlmForCausalLM computes the ChatGLM2/3 network.

Random ChatGLM2-shaped models of other sizes than the fixtures (more kv groups, odd widths,
rope_ratio applied to the base) are built in both and compared in float32.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="optional oracle: pip install torch==2.13.0 transformers")
transformers = pytest.importorskip("transformers", reason="optional oracle: pip install transformers")

from mindglm.config import GLMConfig  # noqa: E402
from mindglm.models import family_module  # noqa: E402
from mindglm.pipeline import GLMModel, load_weights  # noqa: E402


def random_weights(config, seed):
    rng = np.random.default_rng(seed)
    network = family_module(config).build_network(config)
    weights = {}
    for param in network.get_parameters():
        if param.name.endswith("norm.weight"):
            weights[param.name] = (1.0 + 0.1 * rng.standard_normal(param.shape)).astype(np.float32)
        else:
            weights[param.name] = (0.05 * rng.standard_normal(param.shape)).astype(np.float32)
    load_weights(network, weights.items(), "random")
    return GLMModel(config, network), weights


def glm_reference(config, weights, rope_theta):
    hf_config = transformers.GlmConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.multi_query_group_num,
        head_dim=config.kv_channels, rms_norm_eps=config.layernorm_epsilon, attention_bias=True,
        max_position_embeddings=config.seq_length,
        rope_parameters={"partial_rotary_factor": 0.5, "rope_theta": rope_theta, "rope_type": "default"},
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    model = transformers.GlmForCausalLM(hf_config).eval()
    q = config.num_attention_heads * config.kv_channels
    k = config.multi_query_group_num * config.kv_channels
    state = {"model.embed_tokens.weight": weights["embedding.weight"], "model.norm.weight": weights["final_norm.weight"],
             "lm_head.weight": weights["output.weight"]}
    for i in range(config.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            fused = weights[src + "attention.qkv." + kind]
            state[dst + "self_attn.q_proj." + kind] = fused[:q]
            state[dst + "self_attn.k_proj." + kind] = fused[q:q + k]
            state[dst + "self_attn.v_proj." + kind] = fused[q + k:]
        state[dst + "self_attn.o_proj.weight"] = weights[src + "attention.dense.weight"]
        state[dst + "mlp.gate_up_proj.weight"] = weights[src + "mlp.up.weight"]
        state[dst + "mlp.down_proj.weight"] = weights[src + "mlp.down.weight"]
        state[dst + "input_layernorm.weight"] = weights[src + "input_norm.weight"]
        state[dst + "post_attention_layernorm.weight"] = weights[src + "post_attention_norm.weight"]
    model.load_state_dict({name: torch.from_numpy(array) for name, array in state.items()}, strict=True)
    return model


@pytest.mark.parametrize("family,groups,rope_ratio", [("chatglm2", 3, 1.0), ("chatglm3", 2, 4.0)])
def test_random_models_match_transformers(family, groups, rope_ratio):
    config = GLMConfig(family=family, vocab_size=300, hidden_size=96, num_layers=3, num_attention_heads=6,
                       kv_channels=16, multi_query_group_num=groups, ffn_hidden_size=120, seq_length=128,
                       rope_ratio=rope_ratio)
    model, weights = random_weights(config, seed=7)
    reference = glm_reference(config, weights, rope_theta=10000.0 * rope_ratio)
    ids = np.random.default_rng(1).integers(0, config.vocab_size, size=(2, 17))
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(model.logits(ids), expected, atol=1e-4, rtol=0)
    with torch.no_grad():
        expected_tokens = reference.generate(torch.from_numpy(ids[:1]), max_new_tokens=8, do_sample=False,
                                             eos_token_id=None, min_new_tokens=8).numpy()
    np.testing.assert_array_equal(model.generate(ids[:1], max_new_tokens=8, eos_token_id=-1), expected_tokens)
