"""GenerationConfig: the knobs of generate(), named as in Hugging Face transformers."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

from mindglm.config import ConfigError, is_type


@dataclass
class GenerationConfig:
    """Decoding settings. `max_new_tokens` wins over `max_length` (prompt + new) when both are set;
    with neither, a reply may run to the end of the context (the budget rule is
    `mindglm.engine.token_budget`, the same for every front end).

    eos_token_id: None uses the model's stop ids; -1 (or []) never stops early.
    top_k 0 and top_p 1.0 disable those filters; repetition_penalty 1.0 disables it.
    """

    max_length: Optional[int] = None
    max_new_tokens: Optional[int] = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: Union[int, list, None] = None
    pad_token_id: Optional[int] = None
    seed: Optional[int] = None

    def __post_init__(self):
        checks = {  # name: (valid?, what a valid value is)
            "max_length": (lambda v: v is None or (_is_int(v) and v > 0), "a positive int or null"),
            "max_new_tokens": (lambda v: v is None or (_is_int(v) and v > 0),
                               "a positive int or null (a reply needs at least one token; model.logits() "
                               "scores a prompt without generating)"),
            "do_sample": (lambda v: isinstance(v, bool), "true or false"),
            "temperature": (lambda v: _is_number(v) and v > 0, "a number > 0"),
            "top_k": (lambda v: _is_int(v) and v >= 0, "an int >= 0 (0 disables it)"),
            "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
            "repetition_penalty": (lambda v: _is_number(v) and v > 0, "a number > 0 (1.0 disables it)"),
            "eos_token_id": (lambda v: v is None or _is_int(v) or (isinstance(v, list) and all(map(_is_int, v))),
                             "an int, a list of ints or null"),
            "pad_token_id": (lambda v: v is None or _is_int(v), "an int or null"),
            "seed": (lambda v: v is None or _is_int(v), "an int or null"),
        }
        for name, (ok, valid) in checks.items():
            if not ok(getattr(self, name)):
                raise ConfigError(f"generation setting '{name}' is {getattr(self, name)!r}; it must be {valid}")

    @classmethod
    def from_kwargs(cls, base: Optional["GenerationConfig"] = None, **kwargs) -> "GenerationConfig":
        """`base` with `kwargs` applied; an unknown keyword is an error naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"unknown generation setting(s) {unknown}; known: {sorted(known)}")
        values = dataclasses.asdict(base) if base is not None else {}
        values.update({k: v for k, v in kwargs.items()})
        return cls(**values)

    def stop_ids(self, default: list) -> list:
        """The token ids that end a row."""
        if self.eos_token_id is None:
            return list(default)
        ids = [self.eos_token_id] if _is_int(self.eos_token_id) else list(self.eos_token_id)
        return [i for i in ids if i >= 0]


def _is_int(v) -> bool:
    return is_type(v, int)


def _is_number(v) -> bool:
    return is_type(v, float)
