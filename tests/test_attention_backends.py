"""Attention backend dispatch and the Ascend kernel argument layout.

The fused Ascend kernels cannot run on this machine. What is tested here: the dispatch rule,
that FlashAttention builds the kernel call in the layout MindSpore documents (BNSD, mask with
1 = discard, kv heads for GQA, one combined scale), and that an emulation of the documented
kernel semantics fed with exactly those arguments equals the portable path.
"""
import math

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, ops

from mindglm.config import GLMConfig
from mindglm.models.layers import DotProductAttention, FlashAttention, attention_core, use_flash_attention

HEADS, KV_HEADS, DIM = 4, 2, 16


def emulate_kernel(q, k, v, head_num, attn_mask, scale):
    """The documented semantics: softmax(mask(scale * q k^T)) v, BNSD, mask 1 = discard, GQA."""
    q, k, v, discard = (np.asarray(t, np.float64) for t in (q, k, v, attn_mask))
    group = head_num // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = scale * q @ k.transpose(0, 1, 3, 2)
    scores = np.where(discard.astype(bool), -np.inf, scores)
    with np.errstate(invalid="ignore"):  # fully masked padding rows become NaN; callers skip them
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        return (probs / probs.sum(-1, keepdims=True)) @ v


def random_inputs(queries, keys, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, HEADS, queries, DIM)).astype(np.float32)
    k = rng.standard_normal((2, KV_HEADS, keys, DIM)).astype(np.float32)
    v = rng.standard_normal((2, KV_HEADS, keys, DIM)).astype(np.float32)
    allowed = np.tril(np.ones((queries, keys), bool), k=keys - queries)[None, None].repeat(2, 0)
    allowed[1, :, :, :3] = False  # left padding in the second row
    return q, k, v, allowed


def test_dispatch_rule():
    config = GLMConfig(use_flash_attention=True, num_attention_heads=HEADS, multi_query_group_num=KV_HEADS,
                       kv_channels=DIM)
    assert use_flash_attention(config, "Ascend")
    assert not use_flash_attention(config, "CPU") and not use_flash_attention(config, "GPU")
    config.use_flash_attention = False
    assert not use_flash_attention(config, "Ascend")
    config.use_flash_attention = True
    assert isinstance(attention_core(config, 0.25), DotProductAttention)   # this machine targets CPU


@pytest.mark.parametrize("queries,keys", [(8, 8), (1, 12)], ids=["prefill", "decode"])
def test_kernel_arguments_follow_the_documented_layout(queries, keys):
    q, k, v, allowed = random_inputs(queries, keys)
    scale = 1.0 / math.sqrt(DIM)
    flash = FlashAttention(HEADS, KV_HEADS, DIM, query_scale=scale / 3, score_scale=3.0)
    kernel, args, kwargs = flash.kernel_call(Tensor(q), Tensor(k), Tensor(v), Tensor(allowed))
    mask = kwargs["attn_mask"]
    assert mask.dtype == ms.uint8 and mask.shape == (2, 1, queries, keys)
    np.testing.assert_array_equal(mask.asnumpy(), (~allowed).astype(np.uint8))
    assert kwargs["input_layout"] == "BNSD"
    assert args[0].shape == (2, HEADS, queries, DIM) and args[1].shape == (2, KV_HEADS, keys, DIM)
    if queries == 1:
        assert kernel is ops.incre_flash_attention
        allowed[0, :, :, 9:] = False                 # a shorter cache row: 9 keys of the window
        kernel, args, kwargs = flash.kernel_call(Tensor(q), Tensor(k), Tensor(v), Tensor(allowed))
        mask = kwargs["attn_mask"]
        last_allowed = [int(np.nonzero(row[0, 0])[0].max()) + 1 for row in allowed]
        assert kwargs["actual_seq_lengths"].asnumpy().tolist() == last_allowed == [9, keys]
        assert kwargs["num_heads"] == HEADS and kwargs["num_key_value_heads"] == KV_HEADS
        assert kwargs["scale_value"] == pytest.approx(scale)
        head_num = kwargs["num_heads"]
        used_scale = kwargs["scale_value"]
    else:
        assert kernel is ops.flash_attention_score and kwargs["sparse_mode"] == 0
        assert args[3] == HEADS and kwargs["scalar_value"] == pytest.approx(scale)
        head_num, used_scale = args[3], kwargs["scalar_value"]
    emulated = emulate_kernel(args[0].asnumpy(), args[1].asnumpy(), args[2].asnumpy(), head_num,
                              mask.asnumpy(), used_scale)
    portable = DotProductAttention(HEADS, KV_HEADS, DIM, scale / 3, score_scale=3.0)
    out = portable(Tensor(q), Tensor(k), Tensor(v), Tensor(allowed)).asnumpy()
    real = np.broadcast_to(allowed.any(-1), out.shape[:3])   # fully masked (padding) queries carry no meaning
    np.testing.assert_allclose(out[real], emulated[real], atol=2e-5)
