"""ckpt_convert end to end: real fixture checkpoints in, MindSpore/safetensors out, values compared
against independent readers (mindspore.load_checkpoint, the safetensors package, a test-local
torch-pickle reader, and torch itself when it is installed)."""
import collections
import errno
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from ckpt_convert import (CheckpointError, CkptWriter, convert, convert_to_hf, iter_mindglm_tensors, read_ckpt,
                          read_ckpt_entries, read_safetensors, read_torch_bin, save_torch_bin)
from ckpt_convert.__main__ import main
from mindglm.io.tensors import cast
from mindglm.checkpoint import expected_shapes, thudm_name
from mindglm.config import GLMConfig

ms = pytest.importorskip("mindspore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "tests", "fixtures", "models")


def model_dir(name):
    return os.path.join(MODELS, name)


# ------------------------------------------------------------------ independent readers

class _PickleStub(pickle.Unpickler):
    """Test-local reading of torch.save pickles: storages by key, tensors as (pid, offset, size, stride)."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *rest: (storage, offset, size, stride)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return name
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):
        return pid


_STORAGE_NP = {"FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": np.uint16}


def widen(array):
    """bfloat16 bits (uint16) -> float32; other arrays unchanged."""
    return (array.astype(np.uint32) << 16).view(np.float32) if array.dtype == np.uint16 else array


def reference_bin(path):
    out = {}
    with zipfile.ZipFile(path) as zf:
        pkl = next(n for n in zf.namelist() if n.endswith("data.pkl"))
        state = _PickleStub(io.BytesIO(zf.read(pkl))).load()
        for name, (pid, offset, size, stride) in state.items():
            raw = np.frombuffer(zf.read(pkl[:-len("data.pkl")] + "data/" + pid[2]), _STORAGE_NP[pid[1]])
            out[name] = np.lib.stride_tricks.as_strided(raw[offset:], size, [s * raw.itemsize for s in stride]).copy()
    return out


def reference_dir(folder):
    """THUDM name -> array (bfloat16 as uint16 bits) of every shard in `folder`, read independently."""
    from safetensors.numpy import load_file
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".bin"):
            out.update(reference_bin(os.path.join(folder, f)))
        elif f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


def ms_load(path):
    """name -> (tensor_type, float32 values) through mindspore.load_checkpoint."""
    return {k: (str(v.dtype), v.astype(ms.float32).asnumpy()) for k, v in ms.load_checkpoint(path).items()}


def regroup_v1(array, heads, d):
    return array.reshape(heads, 3, d, *array.shape[1:]).swapaxes(0, 1).reshape(array.shape)


def copy_model(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(model_dir(name), dst)
    return dst


def assert_no_output(dst):
    assert not os.path.exists(dst) and not os.path.exists(str(dst) + ".tmp")


# ------------------------------------------------------------------ THUDM -> .ckpt

@pytest.mark.parametrize("model,dtypes", [("chatglm2-tiny", {"BFloat16"}), ("chatglm3-tiny", {"Float16"}),
                                          ("chatglm-tiny", {"Float16", "Float32"})])
def test_convert_fixture_matches_independent_read(model, dtypes, tmp_path):
    dst = str(tmp_path / "model.ckpt")
    stats = convert(model_dir(model), dst)
    config = GLMConfig.from_thudm(model_dir(model))
    loaded = ms_load(dst)
    assert list(loaded) == list(expected_shapes(config))
    assert {t for t, _ in loaded.values()} == dtypes
    assert stats["tensors"] == len(loaded)
    reference = reference_dir(model_dir(model))
    for name, (tensor_type, values) in loaded.items():
        ref = reference[thudm_name(name, config.family)]
        if name.endswith("attention.qkv.weight") or name.endswith("attention.qkv.bias"):
            if config.family == "chatglm":
                ref = regroup_v1(ref, config.num_attention_heads, config.kv_channels)
        assert np.array_equal(values, widen(ref).astype(np.float32)), name
    if config.family == "chatglm":
        norm_types = {t for n, (t, _) in loaded.items() if "norm" in n}
        assert norm_types == {"Float32"} and loaded["embedding.weight"][0] == "Float16"
        assert np.array_equal(reference["lm_head.weight"], reference["transformer.word_embeddings.weight"])


def test_single_bin_written_without_torch(tmp_path):
    folder = tmp_path / "single"
    folder.mkdir()
    shutil.copy(os.path.join(model_dir("chatglm2-tiny"), "config.json"), folder)
    tensors = reference_dir(model_dir("chatglm2-tiny"))
    save_torch_bin(str(folder / "pytorch_model.bin"), tensors.items())
    assert {t.name: t.dtype.name for t in read_torch_bin(str(folder / "pytorch_model.bin"))}[
        "transformer.output_layer.weight"] == "bfloat16"
    convert(str(folder), str(tmp_path / "single.ckpt"))
    convert(model_dir("chatglm2-tiny"), str(tmp_path / "sharded.ckpt"))
    single, sharded = dict(read_ckpt(str(tmp_path / "single.ckpt"), raw=True)), \
        dict(read_ckpt(str(tmp_path / "sharded.ckpt"), raw=True))
    assert list(single) == list(sharded)
    assert all(single[n].dtype == np.uint16 and np.array_equal(single[n], sharded[n]) for n in single)


def test_reader_matches_torch_when_installed(tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed: the optional torch.load comparison is skipped")
    for model in ("chatglm-tiny", "chatglm2-tiny"):
        folder = model_dir(model)
        for f in sorted(os.listdir(folder)):
            if f.endswith(".bin"):
                ref = torch.load(os.path.join(folder, f), weights_only=True)
                for t in read_torch_bin(os.path.join(folder, f)):
                    want = ref[t.name].float().numpy() if ref[t.name].dtype == torch.bfloat16 else ref[t.name].numpy()
                    assert np.array_equal(widen(t.load()), want)
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    views = {"transposed": base.t(), "offset": base[2:5, 3:7], "bf16": base.to(torch.bfloat16)[1:3].t()}
    torch.save(views, tmp_path / "views.bin")
    for t in read_torch_bin(str(tmp_path / "views.bin")):
        assert np.array_equal(widen(t.load()), views[t.name].float().numpy())
    save_torch_bin(str(tmp_path / "ours.bin"), [("w", np.arange(6, dtype=np.float16).reshape(2, 3))])
    assert torch.equal(torch.load(tmp_path / "ours.bin", weights_only=True)["w"],
                       torch.arange(6, dtype=torch.float16).reshape(2, 3))


def test_strided_and_offset_storages(tmp_path):
    """Tensors viewing part of a storage (offset, transposed strides), as torch writes views."""
    from mindglm.io.tensors import DTYPES
    from mindglm.io.torch_bin import state_dict_pickle
    storage = np.arange(60, dtype=np.float32)
    path = str(tmp_path / "views.bin")
    entries = [("transposed", DTYPES["float32"], "0", 60, 0, (10, 6), (1, 10)),
               ("block", DTYPES["float32"], "0", 60, 23, (3, 4), (10, 1)),
               ("column", DTYPES["float32"], "0", 60, 5, (6,), (10,))]
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("views/data/0", storage.tobytes())
        zf.writestr("views/data.pkl", state_dict_pickle(entries))
    grid = storage.reshape(6, 10)
    loaded = {t.name: t.load() for t in read_torch_bin(path)}
    assert np.array_equal(loaded["transposed"], grid.T)
    assert np.array_equal(loaded["block"], grid[2:5, 3:7])
    assert np.array_equal(loaded["column"], grid[:, 5])
    assert all(a.flags.c_contiguous for a in loaded.values())


def test_dtype_casts(tmp_path):
    bf16_src = model_dir("chatglm2-tiny")
    as_f32, as_f16 = str(tmp_path / "f32.ckpt"), str(tmp_path / "f16.ckpt")
    convert(bf16_src, as_f32, dtype="float32")
    convert(bf16_src, as_f16, dtype="fp16")
    original = {n: widen(a) for n, a in read_ckpt(as_f32, raw=True)}
    assert {str(v.dtype) for v in ms.load_checkpoint(as_f32).values()} == {"Float32"}
    f16 = ms.load_checkpoint(as_f16)
    for name, values in original.items():
        assert str(f16[name].dtype) == "Float16"
        want = ms.Tensor(values).astype(ms.float16).asnumpy()
        assert np.array_equal(f16[name].asnumpy(), want), name
    # float16 safetensors -> bfloat16: compare bits with MindSpore's own (round-to-nearest-even) cast.
    as_bf16 = str(tmp_path / "bf16.ckpt")
    convert(model_dir("chatglm3-tiny"), as_bf16, dtype="bfloat16")
    ours = dict(read_ckpt(as_bf16, raw=True))
    for name, tensor in ms.load_checkpoint(as_bf16).items():
        assert str(tensor.dtype) == "BFloat16"
    from safetensors.numpy import load_file
    source = {}
    for f in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        source.update(load_file(os.path.join(model_dir("chatglm3-tiny"), f)))
    emb = source["transformer.embedding.word_embeddings.weight"].astype(np.float32)
    want = ms.Tensor(emb).astype(ms.bfloat16).astype(ms.float32).asnumpy()
    assert np.array_equal(widen(ours["embedding.weight"]), want)


def test_bfloat16_rounding_is_nearest_even():
    values = np.array([1.0, 1.00390625, 1.01171875, 1.0078125 + 2 ** -20, -2.5, np.inf, -np.inf, 3.4e38,
                       np.nan, 0.0, -0.0, 1e-40], np.float32)
    bits = cast(values, "bfloat16")
    assert bits.dtype == np.uint16
    want = ms.Tensor(values).astype(ms.bfloat16).astype(ms.float32).asnumpy()
    got = widen(bits)
    assert np.array_equal(got[~np.isnan(values)], want[~np.isnan(values)])
    assert np.isnan(got[np.isnan(values)]).all()
    assert got[1] == 1.0 and got[2] == 1.015625  # ties to even, both ways
    assert np.array_equal(cast(cast(values[:3], "bfloat16"), "float32"), got[:3])


def test_iter_mindglm_tensors_gives_plain_numpy():
    config = GLMConfig.from_thudm(model_dir("chatglm2-tiny"))
    tensors = dict(iter_mindglm_tensors(model_dir("chatglm2-tiny")))
    assert list(tensors) == list(expected_shapes(config))
    assert {a.dtype for a in tensors.values()} == {np.dtype(np.float32)}  # bf16 widened
    reference = reference_dir(model_dir("chatglm2-tiny"))
    assert np.array_equal(tensors["output.weight"], widen(reference["transformer.output_layer.weight"]))
    for name, array in iter_mindglm_tensors(model_dir("chatglm2-tiny"), reuse=True):
        assert np.array_equal(array, tensors[name])  # a view, compared before the next one is read
    halves = dict(iter_mindglm_tensors(model_dir("chatglm-tiny"), dtype="float16"))
    assert {a.dtype for a in halves.values()} == {np.dtype(np.float16)}
    rounded = dict(iter_mindglm_tensors(model_dir("chatglm3-tiny"), config=model_dir("chatglm3-tiny"),
                                        dtype="bfloat16"))
    emb = rounded["embedding.weight"]
    assert emb.dtype == np.float32 and not (emb.view(np.uint32) & 0xFFFF).any()


# ------------------------------------------------------------------ errors

def test_truncated_bin_shard_leaves_no_output(tmp_path, capsys):
    folder = copy_model("chatglm2-tiny", tmp_path)
    shard = folder / "pytorch_model-00002-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    dst = tmp_path / "out.ckpt"
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin is truncated or corrupt.*re-download"):
        convert(str(folder), str(dst))
    assert_no_output(dst)
    assert main(["--src", str(folder), "--dst", str(dst)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ckpt_convert: error:") and "re-download" in err[0]
    assert_no_output(dst)


def test_corrupt_storage_bytes_fail_the_checksum(tmp_path):
    folder = copy_model("chatglm2-tiny", tmp_path)
    shard = folder / "pytorch_model-00002-of-00002.bin"
    data = bytearray(shard.read_bytes())
    data[data.index(b"data/8") + 200] ^= 0xFF  # a byte inside the largest storage's data
    shard.write_bytes(bytes(data))
    dst = tmp_path / "out.ckpt"
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        convert(str(folder), str(dst))
    assert_no_output(dst)


def test_truncated_safetensors_shard(tmp_path):
    folder = copy_model("chatglm3-tiny", tmp_path)
    shard = folder / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    dst = tmp_path / "out.ckpt"
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors is truncated.*re-download"):
        convert(str(folder), str(dst))
    assert_no_output(dst)


def test_missing_shard_is_named(tmp_path):
    folder = copy_model("chatglm-tiny", tmp_path)
    os.remove(folder / "pytorch_model-00002-of-00002.bin")
    dst = tmp_path / "out.ckpt"
    with pytest.raises(CheckpointError, match="shard pytorch_model-00002-of-00002.bin named in .*index.json.*missing"):
        convert(str(folder), str(dst))
    assert_no_output(dst)


def test_shape_contradicting_config(tmp_path):
    folder = copy_model("chatglm2-tiny", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["ffn_hidden_size"] = 128
    (folder / "config.json").write_text(json.dumps(config))
    dst = tmp_path / "out.ckpt"
    with pytest.raises(CheckpointError) as err:
        convert(str(folder), str(dst))
    message = str(err.value)
    assert "transformer.encoder.layers.0.mlp.dense_h_to_4h.weight" in message
    assert "(320, 64)" in message and "(256, 64)" in message and "config.json" in message
    assert_no_output(dst)


def test_missing_tensor_is_named(tmp_path):
    folder = tmp_path / "partial"
    folder.mkdir()
    shutil.copy(os.path.join(model_dir("chatglm2-tiny"), "config.json"), folder)
    tensors = reference_dir(model_dir("chatglm2-tiny"))
    del tensors["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    save_torch_bin(str(folder / "pytorch_model.bin"), tensors.items())
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.down\.weight.*layers\.1\.mlp\.dense_4h_to_h"):
        convert(str(folder), str(tmp_path / "out.ckpt"))
    assert_no_output(tmp_path / "out.ckpt")


def test_untied_v1_lm_head_is_refused(tmp_path):
    folder = tmp_path / "untied"
    folder.mkdir()
    shutil.copy(os.path.join(model_dir("chatglm-tiny"), "config.json"), folder)
    tensors = reference_dir(model_dir("chatglm-tiny"))
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * np.float16(2)
    save_torch_bin(str(folder / "pytorch_model.bin"), tensors.items())
    with pytest.raises(CheckpointError, match="lm_head.weight' differs from the embedding"):
        convert(str(folder), str(tmp_path / "out.ckpt"))
    assert_no_output(tmp_path / "out.ckpt")


@pytest.mark.parametrize("what", ["empty", "no_config", "bad_index", "legacy", "evil", "dst_dir"])
def test_user_errors_are_clear(what, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(model_dir("chatglm2-tiny"), folder)
    dst, match = str(tmp_path / "out.ckpt"), None
    if what == "empty":
        for f in os.listdir(folder):
            if f != "config.json":
                os.remove(folder / f)
        match = "no weights found in"
    elif what == "no_config":
        os.remove(folder / "config.json")
        match = "pass --config"
    elif what == "bad_index":
        (folder / "pytorch_model.bin.index.json").write_text('{"weight_map": ')
        match = "index.json is truncated or corrupt"
    elif what == "legacy":
        for f in os.listdir(folder):
            if f.endswith((".bin", ".json")) and f != "config.json":
                os.remove(folder / f)
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"a": 1}, protocol=2))
        match = "legacy .*torch.save"
    elif what == "evil":
        shard = folder / "pytorch_model-00001-of-00002.bin"
        with zipfile.ZipFile(shard, "w") as zf:
            zf.writestr("archive/data.pkl", b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR.")
        match = "refusing to load 'os.system'"
    elif what == "dst_dir":
        dst = str(tmp_path)
        match = "should be a file name ending in .ckpt"
    with pytest.raises(CheckpointError, match=match):
        convert(str(folder), dst)
    assert not (tmp_path / "pwned").exists()
    assert not os.path.exists(str(tmp_path / "out.ckpt"))


def test_truncated_ckpt_is_reported(tmp_path):
    dst = tmp_path / "model.ckpt"
    convert(model_dir("chatglm2-tiny"), str(dst))
    data = dst.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="cut.ckpt is truncated or corrupt"):
        list(read_ckpt(str(tmp_path / "cut.ckpt")))
    (tmp_path / "junk.ckpt").write_bytes(b"\x0f" * 64)
    with pytest.raises(CheckpointError, match="junk.ckpt is truncated or corrupt"):
        read_ckpt_entries(str(tmp_path / "junk.ckpt"))


# ------------------------------------------------------------------ MindFormers names

def _save_ms(path, items, append_dict=None):
    params = []
    for name, array in items:
        tensor = ms.Tensor(widen(array))
        if array.dtype == np.uint16:
            tensor = tensor.astype(ms.bfloat16)
        params.append({"name": name, "data": tensor})
    ms.save_checkpoint(params, path, append_dict=append_dict)


def test_mindformers_glm2_ckpt(tmp_path):
    """glm2_6b.ckpt as MindFormers writes it: embedding_weight, plus split q/k/v and gate/up as saved by
    training with qkv_concat/mlp_concat off, inv_freq and optimizer state."""
    config = GLMConfig.from_thudm(model_dir("chatglm2-tiny"))
    q, kv, ffn = 4 * 16, 2 * 16, config.ffn_hidden_size
    items = []
    for name, array in reference_dir(model_dir("chatglm2-tiny")).items():
        name = name.replace("word_embeddings.weight", "embedding_weight")
        if "layers.1.self_attention.query_key_value" in name:
            for part, rows in zip(("wq", "wk", "wv"), np.split(array, [q, q + kv])):
                items.append((name.replace("query_key_value", part), rows))
        elif "layers.0.mlp.dense_h_to_4h" in name:
            items += [(name.replace("dense_h_to_4h", "dense_left"), array[:ffn]),
                      (name.replace("dense_h_to_4h", "dense_right"), array[ffn:])]
        else:
            items.append((name, array))
    items.append(("adam_m.transformer.output_layer.weight", np.zeros((2, 2), np.float32)))
    src = str(tmp_path / "glm2_6b.ckpt")
    _save_ms(src, items, append_dict={"global_step": 7, "note": "saved by a trainer"})
    dst = str(tmp_path / "mindglm.ckpt")
    convert(src, dst, config=model_dir("chatglm2-tiny"))
    convert(model_dir("chatglm2-tiny"), str(tmp_path / "thudm.ckpt"))
    ours, want = dict(read_ckpt(dst, raw=True)), dict(read_ckpt(str(tmp_path / "thudm.ckpt"), raw=True))
    assert list(ours) == list(want)
    assert all(ours[n].dtype == want[n].dtype and np.array_equal(ours[n], want[n]) for n in want)


def test_mindformers_glm_v1_ckpt(tmp_path):
    items = []
    for name, array in reference_dir(model_dir("chatglm-tiny")).items():
        name = name.replace("word_embeddings.weight", "word_embeddings.embedding_table")
        if "layernorm" in name:
            name = name.replace(".weight", ".gamma").replace(".bias", ".beta")
        items.append((name, array))
    src = str(tmp_path / "glm_6b.ckpt")
    _save_ms(src, items)
    shutil.copy(os.path.join(model_dir("chatglm-tiny"), "config.json"), tmp_path)  # found next to the .ckpt
    convert(src, str(tmp_path / "mindglm.ckpt"))
    convert(model_dir("chatglm-tiny"), str(tmp_path / "thudm.ckpt"))
    ours, want = dict(read_ckpt(str(tmp_path / "mindglm.ckpt"))), dict(read_ckpt(str(tmp_path / "thudm.ckpt")))
    assert list(ours) == list(want)
    assert all(ours[n].dtype == want[n].dtype and np.array_equal(ours[n], want[n]) for n in want)


# ------------------------------------------------------------------ round trips and the writer

def test_round_trip_ckpt_safetensors_ckpt_is_bit_identical(tmp_path):
    first = str(tmp_path / "a.ckpt")
    convert(model_dir("chatglm2-tiny"), first)
    hf = tmp_path / "hf"
    stats = convert_to_hf(first, str(hf), config=model_dir("chatglm2-tiny"), max_shard_bytes=100_000)
    assert stats["shards"] > 1 and (hf / "config.json").exists()
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    reference = reference_dir(model_dir("chatglm2-tiny"))
    assert set(index["weight_map"]) == set(reference) - {"transformer.rotary_pos_emb.inv_freq"}
    for shard in set(index["weight_map"].values()):
        for t in read_safetensors(str(hf / shard)):
            assert t.dtype.name == "bfloat16" and np.array_equal(t.load(), reference[t.name])
    second = str(tmp_path / "b.ckpt")
    convert(str(hf), second)
    a, b = list(read_ckpt(first, raw=True)), list(read_ckpt(second, raw=True))
    assert [n for n, _ in a] == [n for n, _ in b]
    assert all(x.dtype == y.dtype and np.array_equal(x, y) for (_, x), (_, y) in zip(a, b))
    assert open(first, "rb").read() == open(second, "rb").read()


def test_v1_round_trip_restores_thudm_qkv_interleave(tmp_path):
    ckpt = str(tmp_path / "v1.ckpt")
    convert(model_dir("chatglm-tiny"), ckpt)
    hf = tmp_path / "hf"
    with pytest.raises(CheckpointError, match="needs --config"):
        convert_to_hf(ckpt, str(hf))
    convert_to_hf(ckpt, str(hf), config=model_dir("chatglm-tiny"))
    reference = reference_dir(model_dir("chatglm-tiny"))
    written = {t.name: t.load() for t in read_safetensors(str(hf / "model.safetensors"))}
    assert set(reference) - set(written) == {"lm_head.weight", "transformer.layers.0.attention.rotary_emb.inv_freq",
                                             "transformer.layers.1.attention.rotary_emb.inv_freq"}
    for name, array in written.items():
        assert array.dtype == reference[name].dtype and np.array_equal(array, reference[name]), name


def test_hf_output_reads_with_safetensors_package(tmp_path):
    from safetensors.numpy import load_file
    ckpt = str(tmp_path / "c3.ckpt")
    convert(model_dir("chatglm3-tiny"), ckpt)
    assert main(["--to-hf", "--src", ckpt, "--dst", str(tmp_path / "hf"), "--dtype", "float32", "-q",
                 "--config", model_dir("chatglm3-tiny")]) == 0
    loaded = load_file(str(tmp_path / "hf" / "model.safetensors"))
    reference = reference_dir(model_dir("chatglm3-tiny"))
    for name, array in loaded.items():
        assert array.dtype == np.float32 and np.array_equal(array, reference[name].astype(np.float32)), name


def test_ckpt_writer_chunks_large_tensors_like_mindspore(tmp_path):
    path = str(tmp_path / "chunks.ckpt")
    rng = np.random.default_rng(0)
    big = rng.standard_normal((37, 11)).astype(np.float32)
    bf16 = cast(rng.standard_normal((5, 7)).astype(np.float32), "bfloat16")
    with CkptWriter(path, chunk_bytes=100) as writer:
        writer.write("big", big)
        writer.write("bf16", bf16)
        writer.write("small", np.arange(3, dtype=np.float16))
    loaded = ms.load_checkpoint(path)
    assert np.array_equal(loaded["big"].asnumpy(), big)
    assert np.array_equal(loaded["bf16"].astype(ms.float32).asnumpy(), widen(bf16))
    assert np.array_equal(loaded["small"].asnumpy(), np.arange(3, dtype=np.float16))
    ours = dict(read_ckpt(path, raw=True))
    assert np.array_equal(ours["big"], big) and np.array_equal(ours["bf16"], bf16)
    # and MindSpore's own multi-chunk files read back the same way
    ms.save_checkpoint([{"name": "x", "data": ms.Tensor(big)}], str(tmp_path / "ms.ckpt"))
    assert np.array_equal(dict(read_ckpt(str(tmp_path / "ms.ckpt")))["x"], big)


def test_cli_module_runs(tmp_path):
    dst = tmp_path / "cli.ckpt"
    result = subprocess.run([sys.executable, "-m", "ckpt_convert", "--src", model_dir("chatglm3-tiny"),
                             "--dst", str(dst), "--dtype", "bf16"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "17 tensors" in result.stdout and "MB/s" in result.stdout
    assert result.stderr.count("\n") == 17  # one progress line per tensor
    bad = subprocess.run([sys.executable, "-m", "ckpt_convert", "--src", str(tmp_path / "nope"), "--dst", str(dst)],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "no checkpoint at" in bad.stderr


# ------------------------------------------------------------------ bad input: signals, full disks, --to-hf

def test_sigterm_leaves_no_tmp_file(tmp_path):
    """SIGTERM during a conversion unwinds like Ctrl-C: no DST.tmp, no DST, and a rerun works."""
    import signal
    dst = tmp_path / "out.ckpt"
    slow = ("import sys, time, mindglm.io.ms_ckpt as w\n"
            "write = w.CkptWriter.write\n"
            "def slow(self, *args):\n"
            "    write(self, *args); print('writing', flush=True); time.sleep(60)\n"
            "w.CkptWriter.write = slow\n"
            "from ckpt_convert.__main__ import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.Popen([sys.executable, "-c", slow, "--src", model_dir("chatglm3-tiny"), "--dst", str(dst), "-q"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    assert os.path.exists(str(dst) + ".tmp")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted; nothing was written" in err and "Traceback" not in err
    assert not os.path.exists(str(dst) + ".tmp") and not dst.exists()
    assert main(["--src", model_dir("chatglm3-tiny"), "--dst", str(dst), "-q"]) == 0 and dst.exists()


@pytest.mark.parametrize("code, fix", [(errno.ENOSPC, "free space there or pass a --dst on another disk"),
                                       (errno.EROFS, "pass a --dst in a writable directory")], ids=["ENOSPC", "EROFS"])
def test_write_errors_name_dst_and_the_fix(tmp_path, monkeypatch, capsys, code, fix):
    dst = str(tmp_path / "out.ckpt")
    write = CkptWriter.write

    def failing(self, name, array):
        write(self, name, array)
        raise OSError(code, os.strerror(code))  # what the kernel says once the first tensor is out

    monkeypatch.setattr(CkptWriter, "write", failing)
    assert main(["--src", model_dir("chatglm3-tiny"), "--dst", dst, "-q"]) == 1
    err = capsys.readouterr().err
    assert f"cannot write --dst {dst}: " in err and fix in err and err.count("\n") == 1
    assert not os.path.exists(dst + ".tmp") and not os.path.exists(dst)
    monkeypatch.undo()
    assert main(["--src", model_dir("chatglm3-tiny"), "--dst", dst, "-q"]) == 0


def test_to_hf_refuses_without_a_config_and_copies_tokenizer_files(tmp_path, capsys):
    ckpt = str(tmp_path / "c3.ckpt")
    convert(model_dir("chatglm3-tiny"), ckpt)
    assert main(["--to-hf", "--src", ckpt, "--dst", str(tmp_path / "hf"), "-q"]) == 1
    assert "no config.json next to" in capsys.readouterr().err and not (tmp_path / "hf").exists()
    # with the config and tokenizer beside the checkpoint, the output is a loadable THUDM directory
    shutil.copy(os.path.join(model_dir("chatglm3-tiny"), "config.json"), tmp_path)
    shutil.copy(os.path.join(ROOT, "tests", "fixtures", "tokenizers", "tokenizer.model"), tmp_path)
    assert main(["--to-hf", "--src", ckpt, "--dst", str(tmp_path / "hf"), "-q"]) == 0
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors", "tokenizer.model"]
    import mindglm
    ref = np.load(os.path.join(model_dir("chatglm3-tiny"), "golden.npz"))
    np.testing.assert_allclose(mindglm.load_model(str(tmp_path / "hf")).logits(ref["single_input_ids"]),
                               ref["single_logits"], atol=1e-4, rtol=0)
