"""Random-shape parity: mindglm's float32 network against an independent float64 numpy forward
(tests/numpy_reference.py) on random THUDM-format checkpoints loaded through load_model()."""
import numpy as np
import pytest

import mindglm
from numpy_reference import V1_SPECIALS, random_checkpoint, reference_logits, write_checkpoint

ATOL = 3e-5  # float32 against float64; measured at 0.4e-6 .. 1.4e-5 on these shapes
VOCAB = 257
# (layers, heads, head_dim, ffn, kv groups): several depths, head counts, widths, odd ffn sizes
SHAPES = [(1, 2, 8, 40, 1), (2, 4, 16, 100, 2), (3, 6, 16, 200, 2), (4, 8, 8, 120, 4), (3, 4, 32, 160, 1)]
FAMILIES = ["chatglm", "chatglm2", "chatglm3"]


def _prompt(family, seed):
    rng = np.random.default_rng(seed)
    ids = [int(i) for i in rng.integers(10, VOCAB, 10)]
    tail = [int(i) for i in rng.integers(10, VOCAB, 5)]
    if family != "chatglm":
        return ids + tail
    # a [gMASK] prompt, then <sop> and a few generated tokens: context, 2D positions, causal part
    return ids + [V1_SPECIALS["gmask_token_id"], V1_SPECIALS["bos_token_id"]] + tail


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}-H{}-D{}-F{}-G{}".format(*s))
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_float64_reference(tmp_path, family, shape):
    layers, heads, head_dim, ffn, groups = shape
    seed = SHAPES.index(shape)
    config, tensors = random_checkpoint(family, layers, heads, head_dim, ffn, VOCAB,
                                        kv_groups=1 if family == "chatglm" else groups, seed=seed,
                                        rope_ratio=1.0 if family == "chatglm" else 1.0 + seed)
    model = mindglm.load_model(write_checkpoint(str(tmp_path / family), config, tensors))
    ids = _prompt(family, seed)
    expected = reference_logits(config, tensors, ids)
    got = model.logits(np.array([ids]))[0]
    assert np.abs(expected).max() > 1.0  # logits of a real size, not a degenerate network
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def test_blank_infilling_matches_float64_reference(tmp_path):
    """ChatGLM-6B with [MASK] (no [gMASK]): positions after <sop> stay at the [MASK] index."""
    config, tensors = random_checkpoint("chatglm", 2, 4, 16, 100, VOCAB, seed=7)
    model = mindglm.load_model(write_checkpoint(str(tmp_path / "v1"), config, tensors))
    ids = [20, 21, V1_SPECIALS["mask_token_id"], 22, 23, V1_SPECIALS["bos_token_id"], 24, 25]
    np.testing.assert_allclose(model.logits(np.array([ids]))[0], reference_logits(config, tensors, ids),
                               atol=ATOL, rtol=0)
