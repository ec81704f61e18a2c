"""load_model(): config + weights -> a model ready to score, generate and chat.

    model = mindglm.load_model("THUDM-dir-or-config.yaml", checkpoint=None, dtype="float32")
    model.logits(input_ids)                       # float32 [batch, seq, vocab], no cache
    model.generate(input_ids, max_new_tokens=16)  # [batch, seq + new]
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from mindglm import chat
from mindglm.config import ConfigError, GLMConfig
from mindglm.generation.config import GenerationConfig
from mindglm.generation.decode import decode_steps, generate
from mindglm.generation.runners import CachedRunner, FullForwardRunner, SequenceState, full_forward
from mindglm.loading import build_loaded_network, load_weights, with_quantize  # noqa: F401 (load_weights: API)
from mindglm.models import family_module


class GLMModel:
    """A built, weight-loaded GLM network plus its runners. Front ends talk to this only."""

    def __init__(self, config: GLMConfig, network, generation: Optional[GenerationConfig] = None):
        self.config = config
        self.network = network
        self.generation_config = generation or GenerationConfig()
        self._full_runner = FullForwardRunner(network, config)
        self._cached_runner = None

    # ------------------------------------------------------------------ scoring
    def logits(self, input_ids, attention_mask=None, position_ids=None) -> np.ndarray:
        """Full forward without cache: float32 [batch, seq, vocab].

        A left-padded batch may pass only `attention_mask`; position ids (and for ChatGLM-6B the
        2D positions and the bidirectional context) are derived as the reference does.
        """
        state = SequenceState(self.config, input_ids, attention_mask, position_ids)
        return full_forward(self.network, self.config, state, last_only=False)

    # ------------------------------------------------------------------ generation
    def runner(self, use_past: Optional[bool] = None):
        """The cached (compiled) runner when use_past, else the exact full-forward one."""
        use_past = self.config.use_past if use_past is None else use_past
        if not use_past:
            return self._full_runner
        if self._cached_runner is None:
            self._cached_runner = CachedRunner(self.network, self.config, self.config.seq_length)
        return self._cached_runner

    def _generation_config(self, max_new_tokens=None, do_sample=None, eos_token_id=None,
                           **settings) -> GenerationConfig:
        if max_new_tokens is not None:
            settings["max_new_tokens"] = max_new_tokens
        if do_sample is not None:
            settings["do_sample"] = do_sample
        if eos_token_id is not None:
            settings["eos_token_id"] = eos_token_id
        return GenerationConfig.from_kwargs(self.generation_config, **settings)

    def generate(self, input_ids, attention_mask=None, position_ids=None, max_new_tokens=None,
                 do_sample=None, eos_token_id=None, streamer=None, use_past=None,
                 **settings) -> np.ndarray:
        """Generate continuations: numpy int64 [batch, seq + new].

        Settings are those of GenerationConfig (max_length, temperature, top_k, top_p,
        repetition_penalty, seed, ...), on top of the model's generation defaults.
        eos_token_id None stops at the model's eos ids; -1 never stops early.
        """
        if max_new_tokens is None and "max_length" not in settings and self.generation_config.max_new_tokens is None \
                and self.generation_config.max_length is None:
            max_new_tokens = 16
        config = self._generation_config(max_new_tokens, do_sample, eos_token_id, **settings)
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None, :]
        return generate(self.runner(use_past), ids, attention_mask, position_ids, config,
                        default_stop_ids=self.config.eos_token_ids, pad_token_id=self.config.pad_id,
                        streamer=streamer)

    # ------------------------------------------------------------------ chat
    def stream_chat(self, tokenizer, query: str, history=None, role: str = "user",
                    truncate_history: bool = False, use_past=None, **generation):
        """Yield `(response_so_far, history)` as the reply grows; the last yield is the final reply.

        The prompt is built by the family's template (mindglm.chat); generation stops at the
        family's stop ids (ChatGLM3 also at <|user|> and <|observation|>). Settings are those of
        generate(); without max_length/max_new_tokens the reply may run to the model's context.
        A prompt longer than the context raises ChatError, or with `truncate_history` drops the
        oldest turns until it fits. The caller's history is never modified.
        """
        family = self.config.family
        if "eos_token_id" in generation:
            raise chat.ChatError("chat() stops at the family's stop tokens (mindglm.chat.stop_token_ids); "
                                 "use generate() for other eos ids")
        history = list(history or [])
        prompt, history = self._fit_prompt(tokenizer, query, history, role, truncate_history)
        if "max_length" not in generation and "max_new_tokens" not in generation and \
                self.generation_config.max_length is None and self.generation_config.max_new_tokens is None:
            generation["max_length"] = self.context_length()
        stop_ids = chat.stop_token_ids(tokenizer, family)
        config = self._generation_config(eos_token_id=stop_ids, **generation)
        budget = config.new_token_budget(len(prompt))
        if budget + len(prompt) > self.context_length():
            budget = self.context_length() - len(prompt)
            config = GenerationConfig.from_kwargs(config, max_new_tokens=budget, max_length=None)
        if budget <= 0:
            raise chat.ChatError(f"the prompt is {len(prompt)} tokens and max_length leaves no room for a reply: "
                                 "raise max_length (or set max_new_tokens), or clear the history")
        decoder = chat.StreamDecoder(tokenizer, family)
        for tokens in decode_steps(self.runner(use_past), np.asarray([prompt]), None, None, config,
                                   pad_token_id=self.config.pad_id):
            token = int(tokens[0])
            text = decoder.push(token)
            if text is not None and token not in stop_ids:
                yield chat.process_response(family, text, history), chat.update_history(family, history, query,
                                                                                       text, role)
        yield chat.finish_turn(tokenizer, family, query, history, decoder.ids, role)

    def chat(self, tokenizer, query: str, history=None, role: str = "user", **generation):
        """One chat turn: `(response, new_history)`, as THUDM's `model.chat()` returns them."""
        result = (None, list(history or []))
        for result in self.stream_chat(tokenizer, query, history, role, **generation):
            pass
        return result

    def context_length(self) -> int:
        """Longest sequence (prompt + reply) the model can run."""
        return self.config.seq_length

    def _fit_prompt(self, tokenizer, query, history, role, truncate_history) -> tuple:
        """Prompt ids for query + history, dropping the oldest turns if allowed and needed."""
        family = self.config.family
        while True:
            prompt = chat.build_chat_ids(tokenizer, family, query, history, role)
            if len(prompt) < self.context_length():
                return prompt, history
            shorter = chat.drop_oldest_turn(family, history) if truncate_history else None
            if shorter is None:
                raise chat.ChatError(
                    f"the prompt is {len(prompt)} tokens, the model's context is {self.context_length()}: "
                    "clear the history, shorten the query, or pass truncate_history=True")
            history = shorter


# ---------------------------------------------------------------------------------- loading
def build_network(config: GLMConfig):
    """The family's network with zero weights."""
    return family_module(config).build_network(config)


def build_model(config: GLMConfig, source: Optional[str], generation: Optional[GenerationConfig] = None) -> GLMModel:
    """Build `config`'s network, rewrite it for its weight format and load weights from `source`:
    a .ckpt (mindglm or MindFormers names) or a THUDM dir — whose single converted .ckpt wins over
    converting on the fly (mindglm/loading.py)."""
    network, config = build_loaded_network(config, source)
    return GLMModel(config, network, generation)


def load_model(path: str, checkpoint: Optional[str] = None, dtype: Optional[str] = "float32",
               use_past: Optional[bool] = None, quantize: Optional[str] = None) -> GLMModel:
    """Build the network described by `path` and load its weights.

    path: a THUDM-format model dir (config.json + .bin/.safetensors weights, converted on the fly
    unless `checkpoint` or a single .ckpt in the dir is given), or a YAML config (its `checkpoint`).
    checkpoint: an explicit .ckpt (mindglm or MindFormers names) or THUDM dir.
    dtype: compute and parameter dtype (None keeps the config's); use_past: the KV-cache path.
    quantize: "int8" / "int4" (THUDM's weight-only formats, quantized on load from fp weights) or
    "fp16" (Linear weights stored in fp16, multiplied in float32); None keeps the checkpoint's.
    """
    if not os.path.exists(path):
        raise ConfigError(f"{path} does not exist: pass a THUDM model directory (config.json + weights) "
                          "or a YAML config from configs/")
    generation = None
    if os.path.isdir(path):
        config, weights = GLMConfig.from_thudm(path), path
    elif path.endswith((".yaml", ".yml")):
        from mindglm.yaml_config import load_run_config
        run = load_run_config(path)
        config, weights, generation = run.model, run.checkpoint, run.generation
    else:
        raise ConfigError(f"{path}: expected a model directory or a .yaml config")
    if dtype is not None:
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"dtype {dtype!r}: expected float32, float16 or bfloat16")
        config.compute_dtype = config.param_dtype = dtype
    if use_past is not None:
        config.use_past = use_past
    return build_model(with_quantize(config, quantize), checkpoint or weights, generation)
