"""Adapters at inference: THUDM P-Tuning v2 and peft LoRA against the reference goldens (float32)."""
import json
import os
import shutil

import numpy as np
import pytest

import mindglm
from mindglm.adapters import LoRALinear, PrefixAttention, prefix_length
from mindglm.config import ConfigError
from conftest import FIXTURES

ATOL = 1e-4
ADAPTERS = os.path.join(FIXTURES, "adapters")
FAMILIES = ("chatglm", "chatglm2", "chatglm3")
CASES = [(kind, family) for kind in ("ptuning", "lora") for family in FAMILIES]
ADAPTER_SUBDIR = {"ptuning": "prefix", "lora": "adapter"}


def case_dir(kind, family):
    return os.path.join(ADAPTERS, kind, f"{family}-{kind}")


def adapter_dir(kind, family):
    return os.path.join(case_dir(kind, family), ADAPTER_SUBDIR[kind])


def base_dir(kind, family):
    return os.path.join(case_dir(kind, family), "base")


def golden(kind, family):
    with np.load(os.path.join(case_dir(kind, family), "golden.npz")) as data:
        return {key: data[key] for key in data.files}


_MODELS = {}


def adapted(kind, family, merge=True):
    key = (kind, family, merge)
    if key not in _MODELS:
        _MODELS[key] = mindglm.load_model(base_dir(kind, family), adapter=adapter_dir(kind, family),
                                          merge_adapter=merge)
    return _MODELS[key]


def cases_of(family):
    return ["single", "mask"] if family == "chatglm" else ["single", "batch"]


@pytest.mark.parametrize("kind,family", CASES)
def test_adapted_logits_match_reference(kind, family):
    ref = golden(kind, family)
    model = adapted(kind, family)
    for case in cases_of(family):
        mask = ref.get(f"{case}_attention_mask")
        logits = model.logits(ref[f"{case}_input_ids"], attention_mask=mask)
        real = np.ones(logits.shape[:2], bool) if mask is None else mask.astype(bool)
        np.testing.assert_allclose(logits[real], ref[f"{case}_logits"][real], atol=ATOL, rtol=0,
                                   err_msg=f"{kind} {family} {case}")
    # the adaptation matters: the base model's logits are elsewhere
    base = mindglm.load_model(base_dir(kind, family)).logits(ref["single_input_ids"])
    assert np.abs(base - ref["single_logits"]).max() > 100 * ATOL


@pytest.mark.parametrize("use_past", [False, True], ids=["no_cache", "kv_cache"])
@pytest.mark.parametrize("kind,family", CASES)
def test_adapted_greedy_generation_matches_reference(kind, family, use_past):
    ref = golden(kind, family)
    model = adapted(kind, family)
    for case in cases_of(family):
        prompt, expected = ref[f"{case}_input_ids"], ref[f"{case}_generated"]
        out = model.generate(prompt, attention_mask=ref.get(f"{case}_attention_mask"),
                             max_new_tokens=expected.shape[1] - prompt.shape[1], eos_token_id=-1, use_past=use_past)
        np.testing.assert_array_equal(out, expected, err_msg=f"{kind} {family} {case} use_past={use_past}")


def test_prefix_is_a_rewrite_and_fills_cache_rows():
    model = adapted("ptuning", "chatglm2")
    assert prefix_length(model.network) == 4
    wrappers = [cell for _, cell in model.network.cells_and_names() if isinstance(cell, PrefixAttention)]
    assert len(wrappers) == model.config.num_layers
    runner = model.engine_for(True).runner
    cache = wrappers[0].attention.cache
    keys = cache.key.asnumpy().reshape(-1, runner.row_len, *cache.key.shape[1:])
    for row in range(keys.shape[0]):     # every row (scratch included) starts with the prefix
        np.testing.assert_array_equal(keys[row, :4], wrappers[0].prefix_key.asnumpy())
    plain = mindglm.load_model(base_dir("ptuning", "chatglm2"))
    assert prefix_length(plain.network) == 0
    assert not any(isinstance(c, PrefixAttention) for _, c in plain.network.cells_and_names())


@pytest.mark.parametrize("family", FAMILIES)
def test_unmerged_lora_equals_merged(family):
    ref = golden("lora", family)
    model = adapted("lora", family, merge=False)
    wrapped = [path for path, cell in model.network.cells_and_names() if isinstance(cell, LoRALinear)]
    targets = json.load(open(os.path.join(adapter_dir("lora", family), "adapter_config.json")))["target_modules"]
    assert len(wrapped) == model.config.num_layers * len(targets)
    names = [p.name for p in model.network.get_parameters()]
    assert len(names) == len(set(names)) and "layers.0.attention.qkv.lora_a" in names
    logits = model.logits(ref["single_input_ids"])
    np.testing.assert_allclose(logits, ref["single_logits"], atol=ATOL, rtol=0)
    merged = adapted("lora", family).logits(ref["single_input_ids"])
    np.testing.assert_allclose(logits, merged, atol=ATOL, rtol=0)


def test_yaml_adapter_key(tmp_path):
    import yaml
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"checkpoint": base_dir("lora", "chatglm3"),
                                      "adapter": adapter_dir("lora", "chatglm3")}))
    model = mindglm.load_model(str(config))
    ref = golden("lora", "chatglm3")
    np.testing.assert_allclose(model.logits(ref["single_input_ids"]), ref["single_logits"], atol=ATOL, rtol=0)
    from mindglm.yaml_config import resolve_run
    run = resolve_run(checkpoint=base_dir("lora", "chatglm3"), adapter=adapter_dir("ptuning", "chatglm3"))
    assert run.adapter == os.path.abspath(adapter_dir("ptuning", "chatglm3"))


# ---------------------------------------------------------------------------------- bad input
def _copy(tmp_path, kind, family):
    dst = tmp_path / f"{kind}-{family}"
    shutil.copytree(adapter_dir(kind, family), dst)
    return dst


def _edit_json(path, **changes):
    raw = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize("kind,base_family,adapter_family,message", [
    ("lora", "chatglm2", "chatglm", "another model family"),
    ("lora", "chatglm", "chatglm2", "another model family"),
    ("lora", "chatglm2", "chatglm3", "another model size"),
    ("ptuning", "chatglm2", "chatglm", "for chatglm, but the model is chatglm2"),
    ("ptuning", "chatglm3", "chatglm2", "another model size"),
])
def test_adapter_for_another_model_is_one_clear_error(kind, base_family, adapter_family, message):
    with pytest.raises(ConfigError, match=message):
        mindglm.load_model(base_dir(kind, base_family), adapter=adapter_dir(kind, adapter_family))


def test_ptuning_without_pre_seq_len_is_one_clear_error(tmp_path):
    bad = _copy(tmp_path, "ptuning", "chatglm3")
    _edit_json(bad / "config.json", pre_seq_len=None)
    with pytest.raises(ConfigError, match="has no pre_seq_len"):
        mindglm.load_model(base_dir("ptuning", "chatglm3"), adapter=str(bad))
    _edit_json(bad / "config.json", pre_seq_len=5)
    with pytest.raises(ConfigError, match="pre_seq_len=5"):
        mindglm.load_model(base_dir("ptuning", "chatglm3"), adapter=str(bad))


def test_bad_adapter_dirs_are_one_clear_error(tmp_path):
    base = base_dir("lora", "chatglm3")
    with pytest.raises(ConfigError, match="is not a directory"):
        mindglm.load_model(base, adapter=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="neither adapter_config.json"):
        mindglm.load_model(base, adapter=str(tmp_path))
    bad = _copy(tmp_path, "lora", "chatglm3")
    _edit_json(bad / "adapter_config.json", use_dora=True)
    with pytest.raises(ConfigError, match="use_dora=True is not supported"):
        mindglm.load_model(base, adapter=str(bad))
    _edit_json(bad / "adapter_config.json", use_dora=False, r=8)
    with pytest.raises(ConfigError, match="another model size"):
        mindglm.load_model(base, adapter=str(bad))
    os.remove(bad / "adapter_model.safetensors")
    with pytest.raises(ConfigError, match="no adapter_model.safetensors or adapter_model.bin"):
        mindglm.load_model(base, adapter=str(bad))


# ---------------------------------------------------------------------------------- front ends
def _random_ptuning(path, family_dir, pre_seq_len=3, seed=0):
    """A THUDM-format P-Tuning dir for the model in `family_dir`, random prefix (save_ptuning)."""
    from mindglm.adapters.prefix import PrefixEncoder
    from mindglm.adapters.save import save_ptuning
    from mindglm.config import GLMConfig
    from mindspore import Tensor
    config = GLMConfig.from_thudm(family_dir)
    size = config.num_layers * 2 * config.kv_heads * config.head_dim
    encoder = PrefixEncoder(pre_seq_len, size, size)
    encoder.embedding.weight.set_data(Tensor(np.random.default_rng(seed).normal(0, 1, (pre_seq_len, size))
                                             .astype(np.float32)))
    save_ptuning(encoder, str(path), json.load(open(os.path.join(family_dir, "config.json"))))
    return encoder


def test_saved_ptuning_round_trips(tmp_path):
    base = base_dir("ptuning", "chatglm2")
    encoder = _random_ptuning(tmp_path / "p", base, pre_seq_len=2)
    assert sorted(os.listdir(tmp_path)) == ["p"]          # written under a temporary name, renamed
    model = mindglm.load_model(base, adapter=str(tmp_path / "p"))
    wrapper = next(cell for _, cell in model.network.cells_and_names() if isinstance(cell, PrefixAttention))
    rows = encoder.embedding.weight.asnumpy().reshape(2, model.config.num_layers, 2, model.config.kv_heads, -1)
    np.testing.assert_array_equal(wrapper.prefix_key.asnumpy(), rows[:, 0, 0])
    np.testing.assert_array_equal(wrapper.prefix_value.asnumpy(), rows[:, 0, 1])


def test_batch_infer_with_adapter_equals_in_process_chat(tmp_path):
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    family_dir = os.path.join(FIXTURES, "chat", "chatglm3-e2e")
    config = os.path.join(repo, "configs", "tiny", "chatglm3_e2e.yaml")
    _random_ptuning(tmp_path / "prefix", family_dir)
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps({"id": 1, "prompt": "你好"}, ensure_ascii=False) + "\n", encoding="utf-8")
    result = subprocess.run([sys.executable, os.path.join(repo, "tools", "batch_infer.py"), "--config", config,
                             "--adapter", str(tmp_path / "prefix"), "--input", str(source), "--output", str(output),
                             "--set", "generation.max_new_tokens=12"], capture_output=True, cwd=repo, timeout=300,
                            env={**os.environ, "GLOG_v": "3", "PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0, result.stderr.decode()
    row = json.loads(output.read_text(encoding="utf-8").splitlines()[0])
    from mindglm.yaml_config import load_run_config
    run = load_run_config(config, ["generation.max_new_tokens=12"])
    tokenizer = run.load_tokenizer()
    settings = {k: v for k, v in run.generation_settings.items() if k != "eos_token_id"}
    adapted_reply = mindglm.load_model(config, adapter=str(tmp_path / "prefix")).chat(tokenizer, "你好", **settings)[0]
    plain_reply = mindglm.load_model(config).chat(tokenizer, "你好", **settings)[0]
    assert row["response"] == adapted_reply != plain_reply
