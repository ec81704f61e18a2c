"""EngineConfig: how many sequences run at once, how long each may grow, how prompts are cut."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mindglm.config import ConfigError, is_type

DEFAULT_MAX_MODEL_LEN = 8192  # a row's slots when the model's own context is longer (32k models)


@dataclass
class EngineConfig:
    """Engine settings (YAML section `engine:`).

    max_num_seqs: cache rows, i.e. sequences decoded together; max_model_len: slots per row —
    prompt plus reply (None: the model's seq_length, at most 8192); chunk_size: prompt tokens
    prefilled per step, so a long prompt never stalls running sequences for more than one chunk;
    max_waiting: requests queued for a row before add_request refuses more (QueueFull);
    decode_steps: greedy decode steps per model call (as vLLM's num_scheduler_steps) where the
    network runs its step as one kernel call (mindglm/fused.py KernelStackStep) and every row
    decoding in the step is greedy without a repetition penalty; each later step is fed the
    argmax of the one before, and the engine keeps it only while its sampler chose the same
    token, so the tokens are those of one step a call. Tokens then stream in bursts of up to
    this many.
    The cache holds max_num_seqs x max_model_len slots per layer, allocated once.
    """

    max_num_seqs: int = 8
    max_model_len: Optional[int] = None
    chunk_size: int = 256
    max_waiting: int = 256
    decode_steps: int = 1

    def __post_init__(self):
        for name in ("max_num_seqs", "max_model_len", "chunk_size", "max_waiting", "decode_steps"):
            value = getattr(self, name)
            if (value is not None or name != "max_model_len") and not (is_type(value, int) and value > 0):
                raise ConfigError(f"engine setting '{name}' is {value!r}; it must be a positive int"
                                  + (" or null" if name == "max_model_len" else ""))

    def model_len(self, seq_length: int) -> int:
        """Slots per row for a model whose context is `seq_length`."""
        if self.max_model_len is None:
            return min(seq_length, DEFAULT_MAX_MODEL_LEN)
        if self.max_model_len > seq_length:
            raise ConfigError(f"engine.max_model_len {self.max_model_len} exceeds the model's context "
                              f"(seq_length {seq_length}): lower it")
        return self.max_model_len


def bucket_for(value: int, buckets: list) -> int:
    """The smallest bucket >= value (buckets sorted ascending; the last one must hold it)."""
    for bucket in buckets:
        if bucket >= value:
            return bucket
    raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")


def powers_of_two_up_to(limit: int) -> list:
    """[1, 2, 4, ..., limit] (limit itself always included)."""
    values, value = [], 1
    while value < limit:
        values.append(value)
        value *= 2
    return values + [limit]
