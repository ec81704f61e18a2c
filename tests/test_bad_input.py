"""User mistakes that must give one clear message and leave everything usable."""
import os
import re

import pytest

import mindglm
from conftest import model_dir
from mindglm.config import ConfigError, GLMConfig
from mindglm.io.weights import iter_mindglm_tensors
from mindglm.pipeline import load_weights
from mindglm.models import family_module


def test_load_model_of_an_empty_path_quotes_it():
    with pytest.raises(ConfigError, match=r"^'' does not exist: pass a THUDM model directory"):
        mindglm.load_model("")


def test_one_missing_tensor_is_named_without_and_others():
    config = GLMConfig.from_thudm(model_dir("chatglm3-tiny"))
    tensors = [(n, a) for n, a in iter_mindglm_tensors(model_dir("chatglm3-tiny"), config) if n != "output.weight"]
    network = family_module(config).build_network(config)
    with pytest.raises(ConfigError, match=r"lacks 1 tensor\(s\) \('output.weight'\); it is incomplete") as info:
        load_weights(network, tensors, "x.ckpt")
    assert "and others" not in str(info.value)
    with pytest.raises(ConfigError, match=r"lacks 4 tensor\(s\) \('[^']+', '[^']+', '[^']+' and others\)"):
        load_weights(network, tensors[:-3], "x.ckpt")


def test_max_new_tokens_zero_is_rejected_at_config_time():
    from mindglm.generation.config import GenerationConfig
    from mindglm.yaml_config import load_run_config
    config = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "tiny", "chatglm3_e2e.yaml")
    with pytest.raises(ConfigError, match=r"key 'generation.max_new_tokens' is 0; it must be a positive int or null "
                                          r"\(a reply needs at least one token"):
        load_run_config(config, ["generation.max_new_tokens=0"])
    with pytest.raises(ConfigError, match="'top_p' is 1.5; it must be a number in"):
        GenerationConfig(top_p=1.5)
    assert load_run_config(config, ["generation.max_new_tokens=1"]).generation.max_new_tokens == 1


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script", ["run_chat.py", "tools/batch_infer.py", "tools/bench_generate.py",
                                    "tools/bench_convert.py", "tools/bench_tokenizer.py", "-m ckpt_convert"])
def test_scripts_without_their_packages_print_one_line(script):
    """-E -S: this Python without site-packages, i.e. without numpy, sentencepiece, yaml, MindSpore."""
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-E", "-S", *script.split(), "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    name = script.split()[-1]
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"{name}: error: this Python (") and "lacks numpy<2" in result.stderr
    assert "run `make chat`" in result.stderr and result.stderr.endswith(f"use .venv/bin/python {script}\n")


def test_bench_compare_torch_without_torch_names_make_reference(monkeypatch, capsys):
    import importlib.util
    import sys
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import bench_generate
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert bench_generate.main(["--compare-torch"]) == 2
    err = capsys.readouterr().err  # transformers may be missing too
    assert re.fullmatch(r"bench_generate.py: error: --compare-torch needs torch( and transformers)? \(optional "
                        r"reference packages\): run `make reference`\n", err), err


def test_yaml_sizes_that_disagree_with_the_weights_are_not_blamed_on_config_json():
    from mindglm.checkpoint import CheckpointError
    from mindglm.pipeline import build_model
    from mindglm.yaml_config import load_run_config
    run = load_run_config(os.path.join(ROOT, "configs", "tiny", "chatglm3_e2e.yaml"),
                          ["model.model_config.ffn_hidden_size=24"])
    with pytest.raises((ConfigError, CheckpointError), match=r"has shape \(16, 32\) but the model config expects "
                                                             r"\(16, 24\) .*ffn_hidden_size=24.*do the model config "
                                                             r"and these weights belong to the same model\?"):
        build_model(run.model, run.require_checkpoint(), run.generation)


def test_prompt_longer_than_the_context_with_truncation_names_only_the_query():
    from conftest import reference_chat
    from mindglm.chat import ChatError
    model, tokenizer, settings, _ = reference_chat(os.path.join(ROOT, "configs", "tiny", "chatglm3_e2e.yaml"),
                                                   ["generation.max_new_tokens=4"])
    with pytest.raises(ChatError, match=r"the model's context is 512: shorten the query$"):
        model.chat(tokenizer, "长" * 600, [], truncate_history=True, **settings)
    with pytest.raises(ChatError, match=r"context is 512: clear the history, shorten the query, or pass "
                                        r"truncate_history=True$"):
        model.chat(tokenizer, "长" * 600, [], **settings)
    response, history = model.chat(tokenizer, "你好", [], truncate_history=True, **settings)
    assert isinstance(response, str) and len(history) == 2


def test_load_model_keeps_the_yaml_dtype_unless_one_is_passed(tmp_path):
    import mindspore as ms
    source = os.path.join(ROOT, "configs", "tiny", "chatglm3_e2e.yaml")
    text = open(source, encoding="utf-8").read().replace("compute_dtype: float32", "compute_dtype: float16")
    text = text.replace("../../tests", os.path.join(ROOT, "tests"))
    yaml_path = tmp_path / "fp16.yaml"
    yaml_path.write_text(text, encoding="utf-8")
    for dtype, expected in ((None, ms.float16), ("float32", ms.float32)):
        model = mindglm.load_model(str(yaml_path), dtype=dtype)   # really built and loaded
        assert model.config.compute_dtype == str(expected).lower()
        assert model.network.layers[0].mlp.up.compute_dtype == expected
    with pytest.raises(ConfigError, match="dtype 'fp8': expected one of float32, float16, bfloat16"):
        mindglm.load_model(str(yaml_path), dtype="fp8")
