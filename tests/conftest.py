"""Shared fixtures: golden model directories converted once per session through ckpt_convert."""
import os

import numpy as np
import pytest

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
MODEL_NAMES = ("chatglm-tiny", "chatglm2-tiny", "chatglm3-tiny")


def model_dir(name: str) -> str:
    return os.path.join(FIXTURES, "models", name)


def golden(name: str) -> dict:
    with np.load(os.path.join(model_dir(name), "golden.npz")) as data:
        return {key: data[key] for key in data.files}


def load_converted(thudm_dir: str, ckpt: str):
    """Convert a THUDM dir to `ckpt` with ckpt_convert, then load_model() from that .ckpt."""
    import ckpt_convert
    import mindglm

    ckpt_convert.convert(thudm_dir, ckpt)
    return mindglm.load_model(thudm_dir, checkpoint=ckpt)


@pytest.fixture(scope="session")
def converted_models(tmp_path_factory):
    """{name: GLMModel} loaded from a .ckpt written by ckpt_convert from the THUDM shards."""
    out = tmp_path_factory.mktemp("converted")
    return {name: load_converted(model_dir(name), str(out / f"{name}.ckpt")) for name in MODEL_NAMES}


_RUN_MODELS = {}


def reference_chat(config: str, overrides=()):
    """(model, tokenizer, chat settings, run config) for a YAML config, built in this process the
    way the front ends build them (one model per config, its generation defaults per call)."""
    from mindglm.yaml_config import load_run_config
    run_config = load_run_config(config, list(overrides))
    if config not in _RUN_MODELS:
        from mindglm.pipeline import load_run_model
        _RUN_MODELS[config] = (load_run_model(run_config), run_config.load_tokenizer())
    model, tokenizer = _RUN_MODELS[config]
    model.generation_config = run_config.generation
    settings = {k: v for k, v in run_config.generation_settings.items() if k != "eos_token_id"}  # chat() sets stop ids
    return model, tokenizer, settings, run_config


@pytest.fixture(scope="session")
def live_servers(tmp_path_factory):
    """tools/serve.py processes on 127.0.0.1 shared by the serving and web page tests:
    `live_servers.get("chatglm3", ...)` (names in tests/live_server.py SERVER_ARGS)."""
    from live_server import ServerPool
    pool = ServerPool(str(tmp_path_factory.mktemp("serve-logs")))
    yield pool
    pool.stop()
