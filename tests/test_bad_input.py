"""User mistakes that must give one clear message and leave everything usable."""
import os

import numpy as np
import pytest

import mindglm
from conftest import golden, model_dir
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
