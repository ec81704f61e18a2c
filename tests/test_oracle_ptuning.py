"""Optional oracle: our P-Tuning v2 output read the way the wave2 fixtures were made.

The goldens are THUDM's model with the prefix encoder loaded as THUDM's README loads it: the
`transformer.prefix_encoder.` names stripped, the rest loaded (strictly) into a PrefixEncoder
sized by config.json, whose get_prompt() output becomes every layer's past keys/values. Here
that path runs in torch over transformers' GlmForCausalLM (the ChatGLM2/3 network,
test_oracle_transformers.py), with THUDM's past: positions from 0, the prefix always attended.
It first reproduces the fixture's golden from THUDM's own checkpoint, then reads ours.
"""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="optional oracle: pip install torch==2.13.0 transformers")
transformers = pytest.importorskip("transformers", reason="optional oracle: pip install transformers")

import mindglm  # noqa: E402
from mindglm.adapters.prefix import add_prefix  # noqa: E402
from mindglm.adapters.save import save_ptuning  # noqa: E402
from conftest import FIXTURES  # noqa: E402
from test_oracle_transformers import glm_reference  # noqa: E402

PREFIX = "transformer.prefix_encoder."


def thudm_prefix_encoder(path: str):
    """(config.json, THUDM ChatGLM2/3's PrefixEncoder with the dir's weights) of a P-Tuning v2 dir."""
    with open(os.path.join(path, "config.json")) as fh:
        cfg = json.load(fh)
    kv_size = cfg["num_layers"] * cfg["kv_channels"] * cfg["multi_query_group_num"] * 2
    encoder = torch.nn.Module()
    encoder.embedding = torch.nn.Embedding(cfg["pre_seq_len"], kv_size)
    if cfg["prefix_projection"]:
        encoder.trans = torch.nn.Sequential(torch.nn.Linear(kv_size, cfg["hidden_size"]), torch.nn.Tanh(),
                                            torch.nn.Linear(cfg["hidden_size"], kv_size))
    state = torch.load(os.path.join(path, "pytorch_model.bin"), weights_only=True)
    encoder.load_state_dict({k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}, strict=True)
    return cfg, encoder


def prefixed_logits(reference, path: str, ids: np.ndarray) -> np.ndarray:
    """GlmForCausalLM's logits with the P-Tuning dir's prefix as THUDM's get_prompt() makes it."""
    cfg, encoder = thudm_prefix_encoder(path)
    batch, length, prefix = ids.shape[0], ids.shape[1], cfg["pre_seq_len"]
    with torch.no_grad():
        rows = encoder.embedding(torch.arange(prefix))
        if cfg["prefix_projection"]:
            rows = encoder.trans(rows)
        # get_prompt: [P, layers * 2, kv groups, head dim]; layer i's keys are chunk 2i, values 2i + 1
        past = rows.view(prefix, cfg["num_layers"] * 2, cfg["multi_query_group_num"], cfg["kv_channels"])
        cache = transformers.DynamicCache(config=reference.config)
        for layer in range(cfg["num_layers"]):
            keys, values = (past[:, 2 * layer + j].permute(1, 0, 2)[None].expand(batch, -1, -1, -1) for j in (0, 1))
            cache.update(keys.contiguous(), values.contiguous(), layer)
        out = reference(input_ids=torch.from_numpy(ids), cache=cache,
                        position_ids=torch.arange(length)[None].expand(batch, -1),
                        attention_mask=torch.ones(batch, prefix + length, dtype=torch.long))
    return out.logits.numpy()


@pytest.mark.parametrize("family", ["chatglm2", "chatglm3"])
def test_our_ptuning_output_loads_in_the_reference_path(family, tmp_path):
    case = os.path.join(FIXTURES, "adapters", "ptuning", f"{family}-ptuning")
    model = mindglm.load_model(os.path.join(case, "base"))
    weights = {p.name: p.asnumpy().astype(np.float32) for p in model.network.get_parameters()}
    reference = glm_reference(model.config, weights, rope_theta=10000.0 * model.config.rope_ratio)
    golden = np.load(os.path.join(case, "golden.npz"))
    ids = golden["single_input_ids"].astype(np.int64)
    # the path is the one the goldens were made by: THUDM's own checkpoint gives the golden
    np.testing.assert_allclose(prefixed_logits(reference, os.path.join(case, "prefix"), ids),
                               golden["single_logits"], atol=1e-4, rtol=0)
    # our output (fresh encoder, with THUDM's projection on chatglm2) read that way: our logits
    projection = family == "chatglm2"
    encoder = add_prefix(model.network, model.config, 5, seed=3, projection=projection)
    with open(os.path.join(case, "base", "config.json")) as fh:
        save_ptuning(encoder, str(tmp_path / "ours"), json.load(fh))
    ours = mindglm.load_model(os.path.join(case, "base"), adapter=str(tmp_path / "ours"))
    batch = golden["batch_input_ids"].astype(np.int64)
    expected = prefixed_logits(reference, str(tmp_path / "ours"), batch)
    np.testing.assert_allclose(ours.logits(batch), expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(model.logits(batch), expected, atol=1e-4, rtol=0)
