"""mindglm: the GLM chat models (ChatGLM-6B, ChatGLM2-6B, ChatGLM3-6B) in MindSpore."""
from mindglm.config import ConfigError, GLMConfig

__version__ = "0.1.0"
__all__ = ["GLMConfig", "ConfigError", "__version__"]
