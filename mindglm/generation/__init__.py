"""Decoding: logits processors, sampling, the decode loop, model runners and streamers."""
from mindglm.generation.config import GenerationConfig
from mindglm.generation.decode import decode_steps, generate
from mindglm.generation.streamers import Streamer, TokenCollector

__all__ = ["GenerationConfig", "generate", "decode_steps", "Streamer", "TokenCollector"]
