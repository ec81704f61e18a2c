"""Weight-only int8/int4 and fp16 weights: THUDM's format bit for bit, the build -> rewrite -> load
order, the CPU kernels against numpy, the portable and Ascend paths, and the user errors.

Fixtures (tests/fixtures/quant/, from THUDM's quantization.py): `fp16/` a model dir, `int8/` and
`int4/` the same weights quantized, `golden_int*.npz` the reference run on `q * scale`.
"""
import dataclasses
import json
import os

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

import mindglm  # noqa: E402
from ckpt_convert import CkptWriter, convert, convert_to_hf  # noqa: E402
from ckpt_convert.__main__ import main as convert_main  # noqa: E402
from mindglm.checkpoint import CheckpointError  # noqa: E402
from mindglm.config import ConfigError, GLMConfig  # noqa: E402
from mindglm.io.sources import list_tensors  # noqa: E402
from mindglm.io.weights import iter_mindglm_tensors  # noqa: E402
from mindglm.pipeline import build_model  # noqa: E402
from mindglm.quantize import WeightLinear  # noqa: E402
from mindglm import weight_formats  # noqa: E402
from mindglm.weight_formats import (dequantize, pack_int4, pack_int4_along_n, quantize_rows,  # noqa: E402
                                    unpack_int4)

QUANT = os.path.join(os.path.dirname(__file__), "fixtures", "quant")
FAMILIES = ("chatglm", "chatglm2")
FORMATS = ("int8", "int4")


def quant_dir(family, kind):
    return os.path.join(QUANT, f"{family}-quant", kind)


def golden(family, fmt):
    with np.load(os.path.join(QUANT, f"{family}-quant", f"golden_{fmt}.npz")) as data:
        return {k: data[k] for k in data.files}


def tensors(path):
    return {t.name: t.load() for t in list_tensors(path)}


_MODELS = {}


def model(family, kind, **changes):
    """A model loaded from a fixture dir (cached: loading compiles nothing, but saves time)."""
    key = (family, kind, tuple(sorted(changes.items())))
    if key not in _MODELS:
        path = quant_dir(family, kind)
        config = dataclasses.replace(GLMConfig.from_thudm(path), **changes)
        _MODELS[key] = build_model(config, path)
    return _MODELS[key]


# ------------------------------------------------------------------ THUDM's format, in numpy
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("block", ["default", "one row"])
def test_quantizing_fp16_reproduces_thudm_bytes(family, fmt, block, monkeypatch):
    if block == "one row":   # a big matrix is quantized in blocks of rows: they must not change a byte
        monkeypatch.setattr(weight_formats, "QUANTIZE_BLOCK_BYTES", 1)
    fp16, shipped = tensors(quant_dir(family, "fp16")), tensors(quant_dir(family, fmt))
    scales = [n for n in shipped if n.endswith(".weight_scale")]
    assert len(scales) == 8
    for scale_name in scales:
        name = scale_name[: -len("_scale")]
        q, scale = quantize_rows(fp16[name], {"int8": 8, "int4": 4}[fmt])
        assert q.dtype == np.int8 and scale.dtype == np.float16
        np.testing.assert_array_equal(q, shipped[name])
        np.testing.assert_array_equal(scale.view(np.uint16), shipped[scale_name].view(np.uint16))


def test_int4_packing_layouts():
    q = np.array([[-8, 7, 1, -1], [0, -3, 5, 2]], np.int8)
    packed = pack_int4(q)
    # column 2j in the high nibble: (-8, 7) -> 0x87, (1, -1) -> 0x1F
    assert packed.view(np.uint8).tolist() == [[0x87, 0x1F], [0x0D, 0x52]]
    np.testing.assert_array_equal(unpack_int4(packed), q)
    # Ascend: [K, N/2] packed along N, element 2j in the low nibble
    ascend = pack_int4_along_n(q).view(np.uint8)
    assert ascend.shape == (4, 1)
    assert ascend[:, 0].tolist() == [(0 << 4) | (-8 & 15), (-3 & 15) << 4 | 7, (5 << 4) | 1, (2 << 4) | (-1 & 15)]
    np.testing.assert_array_equal(dequantize(packed, np.float16([1, 2]), 4), q * np.float32([[1], [2]]))


def test_quantize_rows_errors_and_zero_rows():
    with pytest.raises(CheckpointError, match="odd input size"):
        quantize_rows(np.ones((4, 5), np.float16), 4)
    with pytest.raises(CheckpointError, match="4 or 8 bits"):
        quantize_rows(np.ones((4, 4), np.float16), 3)
    q, scale = quantize_rows(np.zeros((2, 4), np.float32), 8)
    assert not q.any() and not scale.any()


# ------------------------------------------------------------------ THUDM's quantized dirs
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_thudm_quantized_dir_matches_golden(family, fmt):
    gold = golden(family, fmt)
    m = model(family, fmt)
    qkv = m.network.layers[0].attention.qkv
    assert isinstance(qkv, WeightLinear) and qkv.fmt == fmt and m.config.quantization_bit == int(fmt[-1])
    np.testing.assert_allclose(m.logits(gold["single_input_ids"]), gold["single_logits"], atol=1e-4, rtol=0)
    ids = gold["single_input_ids"]
    new = gold["single_generated"].shape[1] - ids.shape[1]
    for use_past in (True, False):  # the compiled KV-cache graph and the PyNative path
        out = m.generate(ids, max_new_tokens=new, eos_token_id=-1, use_past=use_past)
        np.testing.assert_array_equal(out, gold["single_generated"])
    if family == "chatglm2":
        mask = gold["batch_attention_mask"]
        logits = m.logits(gold["batch_input_ids"], attention_mask=mask)
        np.testing.assert_allclose(logits[mask > 0], gold["batch_logits"][mask > 0], atol=1e-4, rtol=0)
        out = m.generate(gold["batch_input_ids"], attention_mask=mask, max_new_tokens=new, eos_token_id=-1)
        np.testing.assert_array_equal(out, gold["batch_generated"])
    else:
        prompt, want = gold["mask_input_ids"], gold["mask_generated"]
        # The int4 golden generates a [gMASK] token: from then on THUDM's prepare_inputs_for_generation
        # takes the mask position from the whole sequence ([gMASK] first), and so does mindglm.
        for use_past in (True, False):
            out = m.generate(prompt, max_new_tokens=want.shape[1] - prompt.shape[1], eos_token_id=-1,
                             use_past=use_past)
            np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("fmt", FORMATS)
def test_portable_backend_equals_kernels(fmt):
    gold = golden("chatglm2", fmt)
    kernels = model("chatglm2", fmt).logits(gold["single_input_ids"])
    portable = model("chatglm2", fmt, linear_backend="portable")
    assert portable.network.layers[0].mlp.up.backend == "portable"
    np.testing.assert_allclose(portable.logits(gold["single_input_ids"]), kernels, atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_on_load_and_via_ckpt(family, tmp_path):
    """load_model(fp16 dir, quantize=...) and `ckpt_convert --quantize` give the shipped function."""
    for fmt in FORMATS:
        gold = golden(family, fmt)
        fly = mindglm.load_model(quant_dir(family, "fp16"), quantize=fmt)
        np.testing.assert_allclose(fly.logits(gold["single_input_ids"]), gold["single_logits"], atol=1e-4, rtol=0)
        ckpt = str(tmp_path / f"{fmt}.ckpt")
        assert convert_main(["--src", quant_dir(family, "fp16"), "--dst", ckpt, "--quantize", fmt, "-q"]) == 0
        stored = dict(iter_mindglm_tensors(ckpt, quant_dir(family, "fp16")))
        assert stored["layers.0.mlp.up.weight"].dtype == np.int8
        assert stored["layers.0.mlp.up.weight_scale"].dtype == np.float16
        loaded = mindglm.load_model(quant_dir(family, "fp16"), checkpoint=ckpt)  # the ckpt says int
        assert loaded.config.quantization_bit == int(fmt[-1])
        np.testing.assert_allclose(loaded.logits(gold["single_input_ids"]), fly.logits(gold["single_input_ids"]),
                                   atol=0, rtol=0)
        # --to-hf writes THUDM's int format back: the shipped dir's bytes, and its config key
        hf = str(tmp_path / f"{fmt}-hf")
        convert_to_hf(ckpt, hf, config=quant_dir(family, "fp16"))
        shipped, written = tensors(quant_dir(family, fmt)), tensors(hf)
        for name, array in written.items():
            np.testing.assert_array_equal(array.view(np.uint8), shipped[name].view(np.uint8), err_msg=name)
        assert {n for n in shipped if "inv_freq" not in n and n != "lm_head.weight"} == set(written)
        with open(os.path.join(hf, "config.json")) as fh:
            assert json.load(fh)["quantization_bit"] == int(fmt[-1])


def test_fp16_weights_keep_fp16_storage():
    gold = golden("chatglm2", "int8")
    ref = model("chatglm2", "fp16").logits(gold["single_input_ids"])
    m = mindglm.load_model(quant_dir("chatglm2", "fp16"), quantize="fp16")
    up = m.network.layers[1].mlp.up
    assert isinstance(up, WeightLinear) and up.weight.dtype == ms.float16
    shipped = tensors(quant_dir("chatglm2", "fp16"))["transformer.encoder.layers.1.mlp.dense_h_to_4h.weight"]
    np.testing.assert_array_equal(up.weight.asnumpy(), shipped)
    np.testing.assert_allclose(m.logits(gold["single_input_ids"]), ref, atol=1e-5, rtol=0)


def test_yaml_quantization_bit(tmp_path):
    from mindglm.pipeline import load_run_model
    from mindglm.yaml_config import load_run_config
    config = tmp_path / "q.yaml"
    config.write_text(f"checkpoint: {quant_dir('chatglm2', 'fp16')}\n"
                      "model:\n  model_config:\n    quantization_bit: 4\n    compute_dtype: float32\n"
                      "context:\n  device_target: CPU\n")
    run = load_run_config(str(config))
    assert run.model.quantization_bit == 4
    built = load_run_model(run)
    assert built.network.layers[0].attention.dense.fmt == "int4"


# ------------------------------------------------------------------ bad input
def _rewrite_ckpt(src_dir, dst, edit):
    with CkptWriter(dst) as writer:
        for name, array in iter_mindglm_tensors(src_dir):
            array = edit(name, array)
            if array is not None:
                writer.write(name, array)


def test_missing_weight_scale_is_one_clear_error(tmp_path):
    bad = str(tmp_path / "bad.ckpt")
    _rewrite_ckpt(quant_dir("chatglm2", "int8"), bad,
                  lambda n, a: None if n == "layers.1.mlp.down.weight_scale" else a)
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.down\.weight_scale"):
        mindglm.load_model(quant_dir("chatglm2", "int8"), checkpoint=bad)


def test_wrong_packed_shape_is_one_clear_error(tmp_path):
    bad = str(tmp_path / "bad.ckpt")
    _rewrite_ckpt(quant_dir("chatglm2", "int4"), bad,
                  lambda n, a: a[:, :-1] if n == "layers.1.mlp.down.weight" else a)
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.down\.weight.*\(64, 79\).*\(64, 80\)"):
        mindglm.load_model(quant_dir("chatglm2", "int4"), checkpoint=bad)


def test_bad_quantization_configs(tmp_path):
    raw = json.load(open(os.path.join(quant_dir("chatglm2", "int8"), "config.json")))
    raw["quantization_bit"] = 3
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="quantization_bit.*3.*8 or 4"):
        GLMConfig.from_thudm(str(tmp_path))
    with pytest.raises(ConfigError, match="int8 weights but the model is configured for int4"):
        mindglm.load_model(quant_dir("chatglm2", "int8"), quantize="int4")
    with pytest.raises(ConfigError, match="quantize='int3'"):
        mindglm.load_model(quant_dir("chatglm2", "int8"), quantize="int3")
    with pytest.raises(CheckpointError, match="odd input size"):
        WeightLinear(5, 4, False, "int4", "portable")
    with pytest.raises(CheckpointError, match="already int8-quantized"):
        convert(quant_dir("chatglm2", "int8"), str(tmp_path / "x.ckpt"), quantize="int4")


def test_missing_compiler_offers_the_portable_path(monkeypatch, tmp_path):
    from mindglm.kernels import build
    monkeypatch.setenv("CXX", "no-such-compiler-g++")
    monkeypatch.setenv("MINDGLM_CACHE_DIR", str(tmp_path))
    build.library_path.cache_clear()
    try:
        with pytest.raises(build.KernelBuildError, match="no-such-compiler-g\\+\\+.*not found.*linear_backend: portable"):
            build.library_path()
    finally:
        build.library_path.cache_clear()


def test_the_6b_benchmark_writes_thudm_dirs_that_load_like_their_weights(tmp_path):
    """tools/bench_6b.py's writer, at bench_generate's tiny sizes: its fp16 shards hold the random
    weights in THUDM's names and dtype, and its int4 dir is those weights quantized THUDM's way
    (the same logits as quantizing the fp16 dir on load)."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
    import bench_6b
    from bench_generate import iter_random_weights
    from mindglm.checkpoint import thudm_name

    report = bench_6b.write(str(tmp_path), "tiny", seed=4)
    assert report["fp16"]["tensors"] == report["int4"]["tensors"] - 4 * 2   # + weight_scale per matrix
    stored = {t.name: t.load() for t in list_tensors(str(tmp_path / "fp16"))}
    config = bench_6b.model_config("tiny")
    for name, array in iter_random_weights(config, 4):
        np.testing.assert_array_equal(stored[thudm_name(name, "chatglm2")], array.astype(np.float16))
    ids = np.random.default_rng(0).integers(3, config.vocab_size, (1, 9))
    on_load = mindglm.load_model(str(tmp_path / "fp16"), quantize="int4").logits(ids)
    np.testing.assert_array_equal(mindglm.load_model(str(tmp_path / "int4")).logits(ids), on_load)
