"""load_model(): config + weights -> a model ready to score, generate and chat.

    model = mindglm.load_model("THUDM-dir-or-config.yaml", checkpoint=None, dtype=None)
    model.logits(input_ids)                       # float32 [batch, seq, vocab], no cache
    model.generate(input_ids, max_new_tokens=16)  # [batch, seq + new], through model.engine
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from mindglm import chat
from mindglm.adapters import adapter_kind, apply_adapter
from mindglm.adapters.prefix import prefix_length, prefixed_mask_inputs
from mindglm.config import DTYPES, ConfigError, GLMConfig
from mindglm.engine import Engine, EngineConfig, PromptTooLong, check_token_ids
from mindglm.engine.model_runner import int_tensor
from mindglm.generation.config import GenerationConfig
from mindglm.loading import build_loaded_network, load_weights, with_quantize  # noqa: F401 (load_weights: API)
from mindglm.models import family_module
from mindglm.parallel.context import ParallelConfig
from mindglm.yaml_config import RunConfig, load_run_config


class GLMModel:
    """A built, weight-loaded GLM network and its engine. Front ends talk to this only.

    Every generation goes through one Engine per model (`model.engine`): generate(), chat(),
    stream_chat(), batch inference and the server are its clients, so any number of them may
    run on one model at once, each getting what it would alone.
    """

    def __init__(self, config: GLMConfig, network, generation: Optional[GenerationConfig] = None,
                 engine_config: Optional[EngineConfig] = None, parallel=None):
        self.config = config
        self.network = network
        self.parallel = parallel  # a ParallelContext when the network is one rank's tensor-parallel share
        self.generation_config = generation or GenerationConfig()
        self.engine_config = engine_config or EngineConfig()
        self._engines = {}
        self._wrap_runner = None

    # ------------------------------------------------------------------ scoring
    def logits(self, input_ids, attention_mask=None, position_ids=None) -> np.ndarray:
        """Full forward without cache: float32 [batch, seq, vocab].

        A left-padded batch may pass only `attention_mask`; position ids (and for ChatGLM-6B the
        2D positions and the bidirectional context) are derived as the reference does.
        """
        ids, mask = _batch_of_ids(input_ids, attention_mask, self.config.vocab_size)
        batch, seq = ids.shape
        if seq > self.config.seq_length:
            raise ConfigError(f"a sequence of {seq} tokens exceeds the model's context "
                              f"(seq_length {self.config.seq_length}): shorten it")
        positions, context = family_module(self.config).prepare_positions(self.config, ids, mask, position_ids)
        query_index = np.broadcast_to(np.arange(seq), (batch, seq))
        masks = prefixed_mask_inputs(prefix_length(self.network), mask, query_index, context)
        logits = self.network(*(int_tensor(a) for a in (ids, positions) + masks))
        return logits.asnumpy()

    # ------------------------------------------------------------------ generation
    def engine_for(self, use_past: Optional[bool] = None) -> Engine:
        """The model's engine: compiled with a KV cache when use_past, else the exact full-forward one."""
        use_past = self.config.use_past if use_past is None else use_past
        if use_past not in self._engines:
            engine = Engine(self.network, self.config, self.engine_config, use_past=use_past,
                            seed_entropy=None if self.parallel is None else self.parallel.seed_entropy)
            if self._wrap_runner is not None:
                engine.runner = self._wrap_runner(engine.runner, use_past)
            self._engines[use_past] = engine
        return self._engines[use_past]

    def wrap_runners(self, wrap) -> None:
        """Route every engine's runner, now and later, through `wrap(runner, use_past)` (rank 0 of
        a tensor-parallel front end sends each runner call to the other ranks: parallel/lockstep.py)."""
        self._wrap_runner = wrap
        for use_past, engine in self._engines.items():
            engine.runner = wrap(engine.runner, use_past)

    @property
    def engine(self) -> Engine:
        return self.engine_for()

    @property
    def max_model_len(self) -> int:
        """Longest sequence (prompt + reply) the engine runs."""
        return self.engine_config.model_len(self.config.seq_length)

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
        repetition_penalty, seed, ...), on top of the model's generation defaults; without a
        budget a row runs to the end of the context. eos_token_id None stops at the model's eos
        ids; -1 never stops early. Each row of a left-padded batch is its own request: it stops
        on its own (then gets pad ids), and its tokens are those it would get alone.
        """
        config = self._generation_config(max_new_tokens, do_sample, eos_token_id, **settings)
        ids, mask = _batch_of_ids(input_ids, attention_mask, self.config.vocab_size)
        explicit = None if position_ids is None else np.asarray(position_ids, np.int64).reshape(ids.shape[0], -1,
                                                                                                ids.shape[1])
        engine = self.engine_for(use_past)
        pad = config.pad_token_id if config.pad_token_id is not None else self.config.pad_id
        rows = []
        try:
            for row in range(ids.shape[0]):
                real = mask[row] > 0
                rows.append(engine.add_request(ids[row, real], config,
                                               position_ids=None if explicit is None else explicit[row][:, real]))
            emitted = 0
            while True:
                longest = max(len(seq.output_ids) for seq in rows)
                while streamer is not None and emitted < longest and \
                        all(seq.finished or len(seq.output_ids) > emitted for seq in rows):
                    streamer.put(np.array([seq.output_ids[emitted] if len(seq.output_ids) > emitted else pad
                                           for seq in rows], np.int64))
                    emitted += 1
                if all(seq.finished for seq in rows):
                    break
                engine.step()
        finally:
            for seq in rows:
                if not seq.finished:
                    engine.abort(seq.request_id)
        if streamer is not None:
            streamer.end()
        steps = max(len(seq.output_ids) for seq in rows)
        new = np.full((ids.shape[0], steps), pad, np.int64)
        for row, seq in enumerate(rows):
            new[row, : len(seq.output_ids)] = seq.output_ids
        return np.concatenate([ids, new], axis=1)

    # ------------------------------------------------------------------ chat
    def stream_chat(self, tokenizer, query: str, history=None, role: str = "user",
                    truncate_history: bool = False, use_past=None, **generation):
        """Yield `(response_so_far, history)` as the reply grows; the last yield is the final reply.

        The prompt is built by the family's template (mindglm.chat); generation stops at the
        family's stop ids (ChatGLM3 also at <|user|> and <|observation|>). Settings are those of
        generate(); without max_length/max_new_tokens the reply may run to the end of the
        context. A prompt longer than the context raises ChatError, or with `truncate_history`
        drops the oldest turns until it fits. The caller's history is never modified.
        """
        family = self.config.family
        if "eos_token_id" in generation:
            raise chat.ChatError("chat() stops at the family's stop tokens (mindglm.chat.stop_token_ids); "
                                 "use generate() for other eos ids")
        history = list(history or [])
        prompt, history = self._fit_prompt(tokenizer, query, history, role, truncate_history)
        stop_ids = chat.stop_token_ids(tokenizer, family)
        engine = self.engine_for(use_past)
        config = self._generation_config(**generation)
        try:
            seq = engine.add_request(prompt, config, stop_ids=stop_ids,
                                     tool_call_ids=chat.tool_call_token_ids(tokenizer, family))
        except PromptTooLong as exc:
            raise chat.ChatError(f"{exc} (Clear the history, or lower max_new_tokens.)") from None
        except ConfigError as exc:    # the budget leaves no room for a reply
            raise chat.ChatError(str(exc)) from None
        decoder = chat.StreamDecoder(tokenizer, family)
        seen = 0
        try:
            while not seq.finished or seen < len(seq.output_ids):
                if seen == len(seq.output_ids):
                    engine.step()
                    continue
                token = seq.output_ids[seen]
                seen += 1
                text = decoder.push(token)
                if text is not None and token not in stop_ids:
                    yield chat.process_response(family, text, history), chat.update_history(family, history, query,
                                                                                           text, role)
        finally:
            if not seq.finished:
                engine.abort(seq.request_id)
        yield chat.finish_turn(tokenizer, family, query, history, decoder.ids, role)

    def chat(self, tokenizer, query: str, history=None, role: str = "user", **generation):
        """One chat turn: `(response, new_history)`, as THUDM's `model.chat()` returns them."""
        result = (None, list(history or []))
        for result in self.stream_chat(tokenizer, query, history, role, **generation):
            pass
        return result

    def _fit_prompt(self, tokenizer, query, history, role, truncate_history) -> tuple:
        """Prompt ids for query + history, dropping the oldest turns if allowed and needed."""
        family = self.config.family
        while True:
            prompt = chat.build_chat_ids(tokenizer, family, query, history, role)
            if len(prompt) < self.max_model_len:
                return prompt, history
            shorter = chat.drop_oldest_turn(family, history) if truncate_history else None
            if shorter is None:
                # with truncate_history the history is already gone: only the query can shrink
                fix = "shorten the query" if truncate_history else \
                    "clear the history, shorten the query, or pass truncate_history=True"
                raise chat.ChatError(
                    f"the prompt is {len(prompt)} tokens, the model's context is {self.max_model_len}: {fix}")
            history = shorter


def _batch_of_ids(input_ids, attention_mask, vocab_size: int) -> tuple:
    """(ids [batch, seq] int64, mask [batch, seq] int64) checked: integers in the vocabulary, at
    least one row and one real token per row — a ValueError naming the problem otherwise."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[0] == 0:
        raise ValueError(f"input_ids must be a [batch, seq] array with at least one row, got shape {ids.shape}")
    mask = np.ones(ids.shape, np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
    for row in range(ids.shape[0]):
        check_token_ids(ids[row][mask[row] > 0], vocab_size, f"prompt of row {row}")
    return ids.astype(np.int64), mask


# ---------------------------------------------------------------------------------- loading
def build_model(config: GLMConfig, source: Optional[str], generation: Optional[GenerationConfig] = None,
                engine: Optional[EngineConfig] = None, parallel: Optional[ParallelConfig] = None,
                adapter: Optional[str] = None, merge_adapter: bool = True) -> GLMModel:
    """Build `config`'s network, rewrite it for its weight format and load weights from `source`:
    a .ckpt (mindglm or MindFormers names) or a THUDM dir — whose single converted .ckpt wins over
    converting on the fly (mindglm/loading.py); then apply `adapter` (mindglm/adapters). With
    `parallel.tensor_parallel` > 1 (inside an msrun launch, every rank making the same call) this
    rank builds and loads only its share."""
    context = None
    if parallel is not None and parallel.tensor_parallel > 1:
        if adapter is not None and adapter_kind(os.path.abspath(os.path.expanduser(adapter))) != "lora":
            raise ConfigError(f"adapter {adapter}: P-Tuning prefixes are not split across ranks; run a P-Tuning "
                              "model with tensor_parallel 1 (LoRA adapters do load with tensor_parallel)")
        from mindglm.parallel.context import init_tensor_parallel
        from mindglm.parallel.sharding import check_tensor_parallel
        check_tensor_parallel(config, parallel.tensor_parallel)   # before any rank waits on another
        context = init_tensor_parallel(parallel.tensor_parallel, parallel.start_timeout)
    network, config = build_loaded_network(config, source, context)
    if adapter is not None:
        apply_adapter(network, config, adapter, merge_adapter)
    return GLMModel(config, network, generation, engine, context)


def load_run_model(run: RunConfig) -> GLMModel:
    """The model of a YAML run config: its network, its checkpoint, its generation defaults."""
    return build_model(run.model, run.require_checkpoint(), run.generation, run.engine, run.parallel, run.adapter)


def load_model(path: str, checkpoint: Optional[str] = None, dtype: Optional[str] = None,
               use_past: Optional[bool] = None, quantize: Optional[str] = None, adapter: Optional[str] = None,
               merge_adapter: bool = True, tensor_parallel: Optional[int] = None) -> GLMModel:
    """Build the network described by `path` and load its weights.

    path: a THUDM-format model dir (config.json + .bin/.safetensors weights, converted on the fly
    unless `checkpoint` or a single .ckpt in the dir is given), or a YAML config (its `checkpoint`).
    checkpoint: an explicit .ckpt (mindglm or MindFormers names) or THUDM dir.
    dtype: compute and parameter dtype; None (the default) keeps the config's (a YAML's
    model_config, or float32 for a THUDM dir); use_past: the KV-cache path.
    quantize: "int8" / "int4" (THUDM's weight-only formats, quantized on load from fp weights) or
    "fp16" (Linear weights stored in fp16, multiplied in float32); None keeps the checkpoint's.
    adapter: a peft LoRA dir or a THUDM P-Tuning v2 dir, applied after loading (a YAML's
    `adapter:` otherwise); merge_adapter=False keeps LoRA unmerged, as LoRALinear cells.
    tensor_parallel: split the model over this many msrun workers (every rank calls load_model
    alike and gets identical results); None keeps a YAML's `parallel.tensor_parallel` (else 1).
    """
    if not os.path.exists(path):
        raise ConfigError(f"{path!r} does not exist: pass a THUDM model directory (config.json + weights) "
                          "or a YAML config from configs/")
    generation = engine = yaml_adapter = None
    parallel = ParallelConfig()
    if os.path.isdir(path):
        config, weights = GLMConfig.from_thudm(path), path
    elif path.endswith((".yaml", ".yml")):
        run = load_run_config(path)
        config, weights, generation, engine, parallel, yaml_adapter = (run.model, run.checkpoint, run.generation,
                                                                       run.engine, run.parallel, run.adapter)
    else:
        raise ConfigError(f"{path}: expected a model directory or a .yaml config")
    if dtype is not None:
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        config.compute_dtype = config.param_dtype = dtype
    if use_past is not None:
        config.use_past = use_past
    if tensor_parallel is not None:
        parallel = ParallelConfig(tensor_parallel, parallel.start_timeout)
    return build_model(with_quantize(config, quantize), checkpoint or weights, generation, engine, parallel,
                       adapter or yaml_adapter, merge_adapter)
