"""Engine: requests in, tokens out. One per model; every front end is its client.

    seq = engine.add_request(prompt_ids, GenerationConfig(max_new_tokens=64))
    while not seq.finished:
        engine.step()            # prefill chunks for new requests + one token for each running one
    seq.output_ids, seq.finish_reason

`step()` is three calls with one hand-off, as in vLLM: the Scheduler plans (plain data), the
runner executes the plan (logits), the Sampler picks each sequence's token; then the scheduler
books the plan. It holds one lock, so any number of threads or interleaved generators may
drive the engine: each advances every sequence, and each reads only its own.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional

import numpy as np

from mindglm.config import ConfigError
from mindglm.engine.config import EngineConfig
from mindglm.engine.model_runner import DecodeSteps, ModelRunner, ReferenceRunner
from mindglm.engine.sampler import sample
from mindglm.engine.scheduler import Scheduler
from mindglm.engine.sequence import Sequence
from mindglm.generation.config import GenerationConfig
from mindglm.models import family_module


class PromptTooLong(ConfigError):
    """A prompt (plus the reply asked for) does not fit the engine's max_model_len."""

    def __init__(self, max_model_len: int, prompt_tokens: int, completion_tokens: int):
        self.max_model_len, self.prompt_tokens, self.completion_tokens = max_model_len, prompt_tokens, completion_tokens
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + completion_tokens} tokens ({prompt_tokens} in the messages, {completion_tokens} in "
            "the completion). Please reduce the length of the messages or completion.")


def check_token_ids(ids, vocab_size: int, what: str = "prompt") -> list:
    """`ids` as a list of ints, or a ValueError saying what is wrong with them."""
    array = np.asarray(ids)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise ValueError(f"the {what} token ids must be integers, got {array.dtype} values: "
                         "pass token ids from the tokenizer (tokenizer.encode)")
    if array.ndim != 1:
        raise ValueError(f"the {what} must be one list of token ids, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"the {what} is empty: give at least one token id")
    bad = array[(array < 0) | (array >= vocab_size)]
    if bad.size:
        raise ValueError(f"the {what} has token id {int(bad[0])}, outside the model's vocabulary "
                         f"(0..{vocab_size - 1}): was it encoded with another model's tokenizer?")
    return [int(i) for i in array]


def token_budget(generation: GenerationConfig, prompt_tokens: int, max_model_len: int) -> tuple:
    """(new tokens to generate, capped?) for a prompt, under one rule for every front end:
    max_new_tokens must fit (else PromptTooLong, as vLLM); max_length (THUDM's prompt + reply)
    is capped to the engine's rows; neither set means up to the end of the row."""
    room = max_model_len - prompt_tokens
    if room <= 0:
        raise PromptTooLong(max_model_len, prompt_tokens, max(generation.max_new_tokens or 0, 1))
    if generation.max_new_tokens is not None:
        if generation.max_new_tokens > room:
            raise PromptTooLong(max_model_len, prompt_tokens, generation.max_new_tokens)
        return generation.max_new_tokens, False
    if generation.max_length is not None:
        budget = min(generation.max_length, max_model_len) - prompt_tokens
        if budget <= 0:
            raise ConfigError(f"the prompt is {prompt_tokens} tokens and max_length {generation.max_length} leaves "
                              "no room for a reply: raise max_length or set max_new_tokens")
        return budget, generation.max_length > max_model_len
    return room, False


def take_tokens(seq: Sequence, logits) -> int:
    """Sample `seq`'s next token(s) from a step's logits [vocab], or from DecodeSteps: step k's
    logits while the token sampled at step k - 1 is the one the call fed step k, and the
    sequence has not finished; returns how many tokens it took."""
    if not isinstance(logits, DecodeSteps):
        seq.append_token(sample(seq, logits))
        return 1
    taken = 0
    for k, step_logits in enumerate(logits.logits):
        token = sample(seq, step_logits)
        seq.append_token(token)
        taken += 1
        if seq.finished or k + 1 == len(logits.fed) or token != logits.fed[k + 1]:
            break
    return taken


class Engine:
    """Scheduler + runner + sampler over one network."""

    def __init__(self, network, config, engine_config: Optional[EngineConfig] = None, use_past: bool = True,
                 seed_entropy: Optional[int] = None):
        self.config = config
        # Tensor-parallel ranks that each run an engine (every rank making the same calls) draw the
        # seeds of unseeded requests from one shared stream, so they all sample the same tokens.
        self._seeds = None if seed_entropy is None else np.random.default_rng(seed_entropy)
        self.engine_config = engine_config or EngineConfig()
        self.max_model_len = self.engine_config.model_len(config.seq_length)
        self.family = family_module(config)
        self.runner = (ModelRunner(network, config, self.engine_config, self.max_model_len) if use_past
                       else ReferenceRunner(network, config))
        self.scheduler = Scheduler(self.engine_config, self.max_model_len, self.runner.decode_steps)
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_ids, generation: Optional[GenerationConfig] = None, stop_ids=None,
                    tool_call_ids=(), listener: Optional[Callable] = None, request_id: Optional[str] = None,
                    position_ids=None) -> Sequence:
        """Queue a request; returns its Sequence. `stop_ids` None: the generation config's eos ids,
        else the model's. `position_ids` [channels, prompt] overrides the family's rule."""
        generation = generation or GenerationConfig()
        prompt = check_token_ids(prompt_ids, self.config.vocab_size)
        budget, capped = token_budget(generation, len(prompt), self.max_model_len)
        if stop_ids is None:
            stop_ids = generation.stop_ids(self.config.eos_token_ids)
        positions, context = self.family.prepare_positions(self.config, np.asarray([prompt]))
        positions, context_length = positions[0], int(context[0])
        rule = self.family.position_rule(self.config)
        if position_ids is not None:   # explicit positions advance by the family's step
            positions, rule = np.asarray(position_ids, np.int64).reshape(positions.shape), None
        seed = generation.seed
        if seed is None and self._seeds is not None:
            seed = int(self._seeds.integers(2 ** 63))
        seq = Sequence(prompt, positions, self.family.POSITION_STEP, context_length, generation, stop_ids,
                       tool_call_ids, budget, request_id, listener, capped, rule, seed=seed)
        with self._lock:
            if request_id is not None and self.scheduler.find(request_id) is not None:
                raise ValueError(f"request id {request_id!r} is already running: use a unique id")
            self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> None:
        """Finish a request with reason "abort"; its row is free for the next step."""
        with self._lock:
            seq = self.scheduler.abort(request_id)
            self._forget(seq)
        if seq is not None and seq.listener is not None:
            seq.listener(seq, [])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ stepping
    def step(self) -> list:
        """One scheduler step; the sequences that got a token (or finished) in it."""
        with self._lock:
            plan = self.scheduler.schedule()
            if plan.empty:
                return []
            try:
                logits = self.runner.execute(plan)
            except Exception:
                # A failed graph call must not leave half-booked sequences behind: end them.
                for item in plan.prefill + plan.decode:
                    self._forget(self.scheduler.abort(item.request_id))
                raise
            by_id = {seq.request_id: seq for seq in self.scheduler.running}
            changed, decoded = [], {}
            for request_id, row_logits in logits.items():
                seq = by_id[request_id]
                decoded[request_id] = take_tokens(seq, row_logits)
                changed.append(seq)
            self.scheduler.update(plan, decoded)
            for seq in changed:
                if seq.finished:
                    self._forget(seq)
        for seq in changed:
            if seq.listener is not None:
                seq.listener(seq, seq.output_ids[-decoded[seq.request_id]:])
        return changed

    def _forget(self, seq) -> None:
        if seq is not None:
            self.runner.release(seq.request_id)

    def run_until_done(self, sequences) -> None:
        """Step until every sequence in `sequences` has finished."""
        while not all(seq.finished for seq in sequences):
            self.step()

    # ------------------------------------------------------------------ graphs and stats
    def warmup(self) -> int:
        """Compile every graph the buckets can need; how many were compiled now."""
        with self._lock:
            return self.runner.warmup()

    @property
    def compiles(self) -> int:
        """Graphs compiled so far (warm-up included)."""
        return self.runner.compiles

    def stats(self) -> dict:
        with self._lock:
            return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                    "rows_in_use": self.engine_config.max_num_seqs - len(self.scheduler.free_rows),
                    "max_num_seqs": self.engine_config.max_num_seqs, "max_model_len": self.max_model_len}
