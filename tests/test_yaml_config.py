"""YAML run configs: every shipped config loads with the right values; mistakes are one clear error."""
import glob
import os
import subprocess
import sys
import textwrap

import pytest

from mindglm.config import ConfigError, GLMConfig
from mindglm.yaml_config import (CHAT_DEFAULTS, apply_overrides, load_run_config, resolve_run,
                                 run_config_for_checkpoint)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_YAML = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))
# fine-tuning configs are not run configs: they name one (tests/test_finetune.py reads them)
FINETUNE = [p for p in ALL_YAML if os.path.basename(p).startswith("finetune_")]
CONFIGS = [p for p in ALL_YAML if p not in FINETUNE]
E2E = os.path.join(REPO, "tests", "fixtures", "chat")
NETWORK_FIELDS = ("family", "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "kv_channels",
                  "multi_query_group_num", "ffn_hidden_size", "seq_length", "layernorm_epsilon", "rmsnorm",
                  "add_qkv_bias", "add_bias_linear", "post_layer_norm",
                  "apply_residual_connection_post_layernorm", "tie_word_embeddings", "rotary_base",
                  "rope_ratio", "bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id", "gmask_token_id")

# THUDM config.json values of the real models.
REAL = {
    "glm/chatglm_6b.yaml": dict(family="chatglm", vocab_size=130528, hidden_size=4096, num_layers=28,
                                num_attention_heads=32, kv_channels=128, multi_query_group_num=32,
                                ffn_hidden_size=16384, seq_length=2048, bos_token_id=130004, eos_token_id=130005,
                                mask_token_id=130000, gmask_token_id=130001, pad_token_id=3, rmsnorm=False,
                                tie_word_embeddings=True, compute_dtype="float16"),
    "glm2/chatglm2_6b.yaml": dict(family="chatglm2", vocab_size=65024, hidden_size=4096, num_layers=28,
                                  num_attention_heads=32, kv_channels=128, multi_query_group_num=2,
                                  ffn_hidden_size=13696, seq_length=32768, rope_ratio=1.0, eos_token_id=2,
                                  pad_token_id=0, rmsnorm=True, add_qkv_bias=True, add_bias_linear=False),
    "glm2/chatglm2_6b_32k.yaml": dict(family="chatglm2", hidden_size=4096, multi_query_group_num=2,
                                      ffn_hidden_size=13696, seq_length=32768, rope_ratio=16.0),
    "glm3/chatglm3_6b.yaml": dict(family="chatglm3", vocab_size=65024, hidden_size=4096, num_layers=28,
                                  num_attention_heads=32, kv_channels=128, multi_query_group_num=2,
                                  ffn_hidden_size=13696, seq_length=8192, rope_ratio=1.0),
    "glm3/chatglm3_6b_32k.yaml": dict(family="chatglm3", hidden_size=4096, seq_length=32768, rope_ratio=50.0),
}
ROPE_SCALING = {"glm2/chatglm2_6b_32k.yaml": "position", "glm3/chatglm3_6b_32k.yaml": "base"}


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def tiny_yaml(tmp_path, extra="", family="chatglm3"):
    """A minimal valid config pointing (by an absolute path) at an e2e fixture."""
    text = f"model:\n  family: {family}\ncheckpoint: {os.path.join(E2E, family + '-e2e')}\n"
    extra = textwrap.dedent(extra)
    if extra.startswith("model:"):
        text = f"checkpoint: {os.path.join(E2E, family + '-e2e')}\n"
    return write(tmp_path, text + extra)


# ---------------------------------------------------------------------------------- shipped configs
def test_every_config_is_shipped():
    names = {os.path.relpath(p, os.path.join(REPO, "configs")) for p in CONFIGS}
    assert set(REAL) | {"tiny/chatglm_e2e.yaml", "tiny/chatglm2_e2e.yaml", "tiny/chatglm3_e2e.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_every_shipped_config_loads(path):
    run = load_run_config(path)
    assert run.source == path
    assert run.context["device_target"] in ("CPU", "GPU", "Ascend")
    assert run.context["mode"] in ("GRAPH_MODE", "PYNATIVE_MODE")
    assert run.generation.max_length and run.generation.max_length <= run.model.seq_length
    assert run.model.use_past


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_model_hyper_parameters(name):
    run = load_run_config(os.path.join(REPO, "configs", name))
    for key, value in REAL[name].items():
        assert getattr(run.model, key) == value, key
    assert run.model.effective_rope_scaling == ROPE_SCALING.get(name, run.model.effective_rope_scaling)
    # Ascend defaults: a half-precision dtype, flash attention, the Ascend device; no checkpoint yet
    assert run.context["device_target"] == "Ascend"
    assert run.model.compute_dtype in ("float16", "bfloat16") and run.model.use_flash_attention
    assert run.checkpoint is None and run.tokenizer is None
    with pytest.raises(ConfigError, match="ckpt_convert"):
        run.require_checkpoint()
    # the chat defaults of THUDM's chat() for the family
    for key, value in CHAT_DEFAULTS[run.family].items():
        if key != "max_length":
            assert getattr(run.generation, key) == value


@pytest.mark.parametrize("name", sorted(REAL))
def test_documented_cpu_override(name):
    run = resolve_run(os.path.join(REPO, "configs", name), device="CPU",
                      overrides=["model.model_config.compute_dtype=float32"])
    assert run.context["device_target"] == "CPU"
    assert run.model.compute_dtype == "float32" and run.model.param_dtype in ("float32", "float16")
    assert not run.model.use_flash_attention
    assert any("flash" in note for note in run.notes)


def test_bfloat16_compute_on_cpu_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"compute_dtype.*compute_dtype=float32"):
        resolve_run(os.path.join(REPO, "configs", "glm3", "chatglm3_6b.yaml"), device="CPU")


@pytest.mark.parametrize("family", ["chatglm", "chatglm2", "chatglm3"])
def test_tiny_configs_describe_their_fixture(family):
    run = load_run_config(os.path.join(REPO, "configs", "tiny", f"{family}_e2e.yaml"))
    fixture = GLMConfig.from_thudm(os.path.join(E2E, f"{family}-e2e"))
    for key in NETWORK_FIELDS:
        assert getattr(run.model, key) == getattr(fixture, key), key
    # relative paths resolve against the YAML file's directory, not the current one
    assert run.checkpoint == os.path.join(E2E, f"{family}-e2e")
    assert run.tokenizer == os.path.join(E2E, f"{family}-e2e")
    assert run.context == {"mode": "PYNATIVE_MODE", "device_target": "CPU", "device_id": 0}
    assert run.generation_settings == {"max_length": 128, "do_sample": False, "temperature": 1.0, "top_k": 0,
                                       "top_p": 1.0, "repetition_penalty": 1.0}


def test_relative_paths_resolve_against_the_yaml_directory(tmp_path, monkeypatch):
    sub = tmp_path / "configs"
    sub.mkdir()
    rel = os.path.relpath(os.path.join(E2E, "chatglm2-e2e"), sub)
    path = write(sub, f"checkpoint: {rel}\nprocessor:\n  tokenizer: {rel}/tokenizer.model\n")
    monkeypatch.chdir(tmp_path)
    run = load_run_config(os.path.join("configs", "run.yaml"))
    assert run.checkpoint == os.path.join(E2E, "chatglm2-e2e")
    assert run.tokenizer == os.path.join(E2E, "chatglm2-e2e", "tokenizer.model")
    # ... while a path given as an override is relative to the current directory
    monkeypatch.chdir(E2E)
    run = load_run_config(path, ["checkpoint=chatglm2-e2e"])
    assert run.checkpoint == os.path.join(E2E, "chatglm2-e2e")


def test_hyper_parameters_come_from_a_thudm_checkpoint_dir(tmp_path):
    run = load_run_config(tiny_yaml(tmp_path, family="chatglm2"))
    assert run.family == "chatglm2" and run.model.hidden_size == 16 and run.model.seq_length == 512
    assert run.tokenizer == os.path.join(E2E, "chatglm2-e2e")  # default: the checkpoint's dir
    assert run.generation_settings["max_length"] == CHAT_DEFAULTS["chatglm2"]["max_length"]
    assert run.generation.top_p == 0.8 and run.generation.do_sample


def test_run_config_for_a_bare_checkpoint_dir():
    run = run_config_for_checkpoint(os.path.join(E2E, "chatglm-e2e"), ["generation.do_sample=false"])
    assert run.family == "chatglm" and run.model.bos_token_id == 130004
    assert run.model.use_past and run.context["device_target"] == "CPU"
    assert run.generation.do_sample is False and run.generation.top_p == CHAT_DEFAULTS["chatglm"]["top_p"]
    with pytest.raises(ConfigError, match="does not exist"):
        run_config_for_checkpoint(os.path.join(E2E, "missing"))


def test_load_model_accepts_a_yaml_config():
    import mindglm
    model = mindglm.load_model(os.path.join(REPO, "configs", "tiny", "chatglm3_e2e.yaml"))
    assert model.config.family == "chatglm3" and model.config.hidden_size == 16
    assert model.generation_config.max_length == 128 and model.generation_config.do_sample is False


# ---------------------------------------------------------------------------------- mistakes
@pytest.mark.parametrize("text, key", [
    ("modle:\n  family: chatglm3\n", "modle"),
    ("generation:\n  top_q: 0.5\n", "generation.top_q"),
    ("context:\n  device: CPU\n", "context.device"),
    ("processor:\n  vocab_file: x\n", "processor.vocab_file"),
    ("model:\n  model_config:\n    hiden_size: 16\n", "hiden_size"),
    ("model:\n  arch: glm\n", "model.arch"),
])
def test_unknown_key_is_named(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    message = str(info.value)
    assert key in message and path in message and "\n" not in message


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'top_p'"):
        load_run_config(tiny_yaml(tmp_path, "generation:\n  top_q: 0.5\n"))


@pytest.mark.parametrize("text, key", [
    ("generation:\n  top_p: high\n", "generation.top_p"),
    ("generation:\n  do_sample: 1\n", "generation.do_sample"),
    ("generation:\n  max_length: 12.5\n", "generation.max_length"),
    ("context:\n  device_id: zero\n", "context.device_id"),
    ("checkpoint: 12\n", "checkpoint"),
    ("model:\n  model_config:\n    num_layers: two\n", "num_layers"),
    ("model:\n  model_config:\n    use_past: 'yes'\n", "use_past"),
    ("model: [1, 2]\n", "model"),
])
def test_wrong_type_is_named(tmp_path, text, key):
    with pytest.raises(ConfigError) as info:
        load_run_config(tiny_yaml(tmp_path, text))
    assert key in str(info.value)


@pytest.mark.parametrize("text, key", [
    ("generation:\n  top_p: 1.5\n", "generation.top_p"),
    ("generation:\n  temperature: 0\n", "generation.temperature"),
    ("context:\n  mode: FAST_MODE\n", "context.mode"),
    ("context:\n  device_target: TPU\n", "context.device_target"),
    ("model:\n  family: chatglm4\n", "model.family"),
])
def test_bad_value_is_named(tmp_path, text, key):
    path = write(tmp_path, text.replace("model:\n  family: chatglm4\n", "model:\n  family: chatglm4\n"))
    with pytest.raises(ConfigError) as info:
        load_run_config(path if "family" in text else tiny_yaml(tmp_path, text))
    assert key in str(info.value)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'checkpoint': .*nowhere\.ckpt does not exist.*ckpt_convert"):
        load_run_config(write(tmp_path, "checkpoint: nowhere.ckpt\n"))
    with pytest.raises(ConfigError, match=r"key 'processor.tokenizer': .*nowhere\.model does not exist"):
        load_run_config(tiny_yaml(tmp_path, "processor:\n  tokenizer: nowhere.model\n"))
    with pytest.raises(ConfigError, match=r"config file .*absent\.yaml does not exist"):
        load_run_config(str(tmp_path / "absent.yaml"))


def test_yaml_syntax_and_duplicate_keys(tmp_path):
    # the unclosed bracket is on line 2; the parser only notices at the end of the file (line 3)
    with pytest.raises(ConfigError, match=r"invalid YAML at line 3, column 1: .*\(while parsing a flow "
                                          r"sequence started at line 2, column 10\)"):
        load_run_config(write(tmp_path, "generation:\n  top_p: [0.5\n"))
    with pytest.raises(ConfigError, match=r"invalid YAML at line 2, column 11: mapping values are not allowed here$"):
        load_run_config(write(tmp_path, "model:\n  family: : chatglm3\n"))
    with pytest.raises(ConfigError, match="duplicate key 'top_p'"):
        load_run_config(tiny_yaml(tmp_path, "generation:\n  top_p: 0.5\n  top_p: 0.6\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_run_config(write(tmp_path, "- a\n- b\n"))


def test_exponent_floats_and_numeric_modes(tmp_path):
    run = load_run_config(tiny_yaml(tmp_path, "model:\n  family: chatglm3\n  model_config:\n"
                                              "    layernorm_epsilon: 1e-6\n"
                                              "context:\n  mode: 0\n  device_target: cpu\n"))
    assert run.model.layernorm_epsilon == 1e-6
    assert run.context["mode"] == "GRAPH_MODE" and run.context["device_target"] == "CPU"


def test_family_disagreement(tmp_path):
    with pytest.raises(ConfigError, match="disagree"):
        load_run_config(write(tmp_path, "model:\n  family: chatglm3\n  model_config:\n    family: chatglm2\n"))


def test_config_without_model_or_thudm_dir(tmp_path):
    with pytest.raises(ConfigError, match="no 'model' section"):
        load_run_config(write(tmp_path, "generation:\n  top_p: 0.5\n"))


# ---------------------------------------------------------------------------------- overrides
def test_overrides_are_yaml_typed():
    raw = {"generation": {"top_p": 0.8}}
    out = apply_overrides(raw, ["generation.top_p=0.5", "generation.do_sample=false", "generation.seed=null",
                                "generation.eos_token_id=[2, 64795]", "model.model_config.use_past=true",
                                "model.family=chatglm2", "processor.tokenizer=/a: b", "checkpoint=x.ckpt"])
    assert out == {"generation": {"top_p": 0.5, "do_sample": False, "seed": None, "eos_token_id": [2, 64795]},
                   "model": {"model_config": {"use_past": True}, "family": "chatglm2"},
                   "processor": {"tokenizer": "/a: b"}, "checkpoint": "x.ckpt"}
    assert raw == {"generation": {"top_p": 0.8}}  # the input is not modified
    assert apply_overrides({}, ["checkpoint=123"]) == {"checkpoint": "123"}  # a path stays text
    assert apply_overrides({}, [("generation.seed", 5)]) == {"generation": {"seed": 5}}  # tuples set values as is


@pytest.mark.parametrize("override, key", [
    ("generation.top_q=0.5", "generation.top_q"),
    ("model.model_config.hiden_size=8", "hiden_size"),
    ("model.model_config.hidden_size.x=8", "hidden_size"),
    ("contexts.mode=0", "contexts"),
    ("checkpoint.path=x", "checkpoint"),
])
def test_unknown_override_key_is_named(override, key):
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, [override])
    assert key in str(info.value) and override in str(info.value)


def test_malformed_override():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["generation.top_p"])


def test_overrides_apply_and_are_validated(tmp_path):
    path = os.path.join(REPO, "configs", "tiny", "chatglm2_e2e.yaml")
    run = load_run_config(path, ["generation.top_p=0.5", "generation.do_sample=true", "generation.seed=7",
                                 "model.model_config.use_past=false"])
    assert run.generation.top_p == 0.5 and run.generation.do_sample and run.generation.seed == 7
    assert run.generation_settings["seed"] == 7 and not run.model.use_past
    assert "with overrides" in run.source
    with pytest.raises(ConfigError, match="generation.top_p"):
        load_run_config(path, ["generation.top_p=2"])
    with pytest.raises(ConfigError, match="hidden_size"):
        load_run_config(path, ["model.model_config.hidden_size=big"])


# ---------------------------------------------------------------------------------- device context
def _apply(context: str) -> subprocess.CompletedProcess:
    code = ("import sys\nfrom mindglm.config import ConfigError\nfrom mindglm.yaml_config import apply_context\n"
            f"try:\n    apply_context({context})\nexcept ConfigError as e:\n    print('ERR', e); sys.exit(3)\n"
            "import mindspore as ms\nprint('OK', ms.get_context('mode'), ms.get_current_device().device_target)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "GLOG_v": "3"})


def test_apply_context_cpu():
    result = _apply("{'mode': 'GRAPH_MODE', 'device_target': 'CPU', 'device_id': 0}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["OK", "0", "CPU"]


def test_unavailable_device_is_one_readable_error():
    result = _apply("{'mode': 'PYNATIVE_MODE', 'device_target': 'Ascend', 'device_id': 0}")
    if result.returncode == 0:
        pytest.skip("this machine has Ascend")
    assert result.returncode == 3, result.stderr
    assert "device_target Ascend" in result.stdout and "--device CPU" in result.stdout
    assert len(result.stdout.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_engine_section_is_read_and_checked(tmp_path):
    run = load_run_config(tiny_yaml(tmp_path, "engine:\n  max_num_seqs: 3\n  max_model_len: 256\n  chunk_size: 32\n"))
    assert (run.engine.max_num_seqs, run.engine.max_model_len, run.engine.chunk_size) == (3, 256, 32)
    assert load_run_config(tiny_yaml(tmp_path)).engine.max_num_seqs == 8        # defaults when absent
    with pytest.raises(ConfigError, match="key 'engine.max_num_seqs' is 0; it must be a positive int"):
        load_run_config(tiny_yaml(tmp_path, "engine:\n  max_num_seqs: 0\n"))
    with pytest.raises(ConfigError, match="max_model_len 100000 exceeds the model's context"):
        load_run_config(tiny_yaml(tmp_path, "engine:\n  max_model_len: 100000\n"))
    with pytest.raises(ConfigError, match="max_batch"):
        load_run_config(tiny_yaml(tmp_path, "engine:\n  max_batch: 4\n"))
