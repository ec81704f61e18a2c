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
