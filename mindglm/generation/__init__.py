"""Decoding settings, logits processors, sampling and streamers (the loop itself is mindglm.engine)."""
from mindglm.generation.config import GenerationConfig
from mindglm.generation.streamers import Streamer

__all__ = ["GenerationConfig", "Streamer"]
