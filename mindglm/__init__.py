"""mindglm: the GLM chat models (ChatGLM-6B, ChatGLM2-6B, ChatGLM3-6B) in MindSpore.

    import mindglm
    model = mindglm.load_model("path/to/chatglm3-6b")       # THUDM dir, .yaml config
    tokenizer = mindglm.load_tokenizer("path/to/chatglm3-6b")
    response, history = model.chat(tokenizer, "你好")

Heavy modules (MindSpore) load on first use, so `import mindglm` stays cheap.
"""
from mindglm.config import ConfigError, GLMConfig

__version__ = "0.1.0"

_LAZY = {
    "load_model": "mindglm.pipeline",
    "GLMModel": "mindglm.pipeline",
    "GenerationConfig": "mindglm.generation.config",
    "load_tokenizer": "mindglm.tokenization",
}
__all__ = ["GLMConfig", "ConfigError", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mindglm' has no attribute {name!r}")
