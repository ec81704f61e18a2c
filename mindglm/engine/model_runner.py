"""Model runners: turn a StepPlan into next-token logits, one row of logits per sampled sequence.

`ModelRunner` owns the KV cache pool and the compiled graphs. Every call is one graph keyed by
(rows, tokens, window) buckets: a prefill chunk is one row of `tokens` (padded to a token
bucket), a decode step is every decoding row at once (padded to a row bucket), and the window
is the smallest window bucket that holds the longest row after its write — it follows the rows'
current lengths, not their budgets. `warmup()` compiles every reachable key once; after it no
workload compiles anything more.

`ReferenceRunner` is the exact path (use_past: false): no cache, every step runs the network
over each sequence's whole history in PyNative.

A P-Tuning network (mindglm/adapters/prefix.py) has P prefix keys ahead of every row's tokens:
the ModelRunner's rows are P slots longer, the prefix fills slots [0, P) once, and token t of a
row lives at slot P + t; the ReferenceRunner shifts its mask inputs the same way.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from mindglm.adapters.prefix import fill_prefix_slots, prefix_length, shift_mask_inputs
from mindglm.engine.config import EngineConfig, bucket_for, powers_of_two_up_to
from mindglm.engine.scheduler import StepPlan


def int_tensor(array) -> Tensor:
    return Tensor(np.ascontiguousarray(array, dtype=np.int32))


class CompiledStep(nn.Cell):
    """The network with its KV cache behind one graph-compiled call (logits of each row's last real token)."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    @ms.jit
    def construct(self, input_ids, position_ids, key_valid, query_index, context_lengths, slot_mapping, kv_rows,
                  last_index):
        return self.network(input_ids, position_ids, key_valid, query_index, context_lengths, slot_mapping, kv_rows,
                            last_index)


class ModelRunner:
    """The cache pool (`max_num_seqs` rows + one scratch row for padding) and its compiled graphs."""

    def __init__(self, network, config, engine_config: EngineConfig, max_model_len: int):
        self.network, self.config = network, config
        self.rows = engine_config.max_num_seqs
        self.max_len = max_model_len
        self.prefix = prefix_length(network)  # P-Tuning's prefix slots at the head of every row
        self.row_len = self.prefix + max_model_len
        self.scratch_row = self.rows          # padding tokens write here, never read
        chunk = min(engine_config.chunk_size, max_model_len)
        # GLM v1 prefills its (bidirectional) context whole, so its prompts need buckets up to the row.
        longest_prefill = max_model_len if config.family == "chatglm" else chunk
        self.token_buckets = sorted({b for b in config.prefill_buckets if b < longest_prefill} | {longest_prefill})
        # Windows in token terms, plus the prefix every row starts with.
        self.window_buckets = [self.prefix + b for b in sorted(
            {b for b in config.prefill_buckets if b < max_model_len} | {max_model_len} | set(self.token_buckets))]
        self.row_buckets = powers_of_two_up_to(self.rows)
        self.chunk = chunk
        network.setup_caches(self.rows + 1, self.row_len)
        fill_prefix_slots(network)
        self.step = CompiledStep(network)
        self.signatures = set()               # (rows, tokens, window) of each graph compiled
        self.compiles = 0

    # ------------------------------------------------------------------ buckets
    def prefill_shape(self, start: int, length: int) -> tuple:
        """(token bucket, window) of a chunk of `length` tokens from `start`. A first chunk attends
        to itself only; later chunks are padded to the chunk size, so they need one graph per
        window and no more."""
        if start == 0:
            tokens = bucket_for(length, self.token_buckets)
            return tokens, bucket_for(self.prefix + tokens, self.window_buckets)
        return self.chunk, bucket_for(self.prefix + start + length, self.window_buckets)

    def reachable_shapes(self) -> list:
        """Every (rows, tokens, window) key a workload can need, prefill and decode."""
        keys = set()
        for tokens in self.token_buckets:
            keys.add((1,) + self.prefill_shape(0, tokens))
        if self.config.family != "chatglm":      # GLM v1 prefills in one chunk (see Scheduler)
            for window in self.window_buckets:
                keys.add((1, self.chunk, window))
        for rows in self.row_buckets:
            for window in self.window_buckets:
                keys.add((rows, 1, window))
        return sorted(keys)

    # ------------------------------------------------------------------ execution
    def execute(self, plan: StepPlan) -> dict:
        """Run a plan: {request_id: float32 logits [vocab]} for every chunk that ends its prompt
        and every decode row."""
        logits = {}
        for chunk in plan.prefill:
            row_logits = self._prefill(chunk)
            if chunk.samples:
                logits[chunk.request_id] = row_logits
        if plan.decode:
            for row, row_logits in zip(plan.decode, self._decode(plan.decode)):
                logits[row.request_id] = row_logits
        return logits

    def _prefill(self, chunk) -> np.ndarray:
        length = len(chunk.token_ids)
        tokens, window = self.prefill_shape(chunk.start, length)
        channels = chunk.positions.shape[0]
        ids = np.full((1, tokens), self.config.pad_id)
        ids[0, :length] = chunk.token_ids
        positions = np.zeros((1, channels, tokens))
        positions[0, :, :length] = chunk.positions
        first, end = self.prefix + chunk.start, self.prefix + chunk.start + length   # slots of the chunk
        key_valid = (np.arange(window) < end)[None]
        query_index = np.full((1, tokens), end - 1)
        query_index[0, :length] = np.arange(first, end)
        slots = self.scratch_row * self.row_len + np.arange(tokens)
        slots[:length] = chunk.row * self.row_len + np.arange(first, end)
        context = self.prefix + chunk.context_length
        return self._run(ids, positions, key_valid, query_index, [context], slots, [chunk.row], [length - 1])[0]

    def _decode(self, decode_rows) -> np.ndarray:
        count = len(decode_rows)
        rows = bucket_for(count, self.row_buckets)
        window = bucket_for(self.prefix + max(r.slot for r in decode_rows) + 1, self.window_buckets)
        channels = decode_rows[0].position.shape[0]
        ids = np.full((rows, 1), self.config.pad_id)
        positions = np.zeros((rows, channels, 1))
        key_valid = np.zeros((rows, window))
        query_index = np.zeros((rows, 1))
        context = np.zeros(rows)
        slots = self.scratch_row * self.row_len + np.arange(rows)
        kv_rows = np.full(rows, self.scratch_row)
        for b, row in enumerate(decode_rows):
            slot = self.prefix + row.slot
            ids[b, 0] = row.token_id
            positions[b, :, 0] = row.position
            key_valid[b, : slot + 1] = 1
            query_index[b, 0] = slot
            context[b] = self.prefix + row.context_length
            slots[b] = row.row * self.row_len + slot
            kv_rows[b] = row.row
        return self._run(ids, positions, key_valid, query_index, context, slots, kv_rows, np.zeros(rows))[:count]

    def release(self, request_id: str) -> None:
        """Nothing to do: a freed row's stale slots are never admitted by the mask."""

    def _run(self, *arrays) -> np.ndarray:
        ids, key_valid = arrays[0], arrays[2]
        key = (ids.shape[0], ids.shape[1], key_valid.shape[1])
        if key not in self.signatures:
            self.signatures.add(key)
            self.compiles += 1
        try:
            return self.step(*(int_tensor(a) for a in arrays)).asnumpy()
        except Exception:
            # MindSpore leaves a compiled graph that raised unusable ("Invalid output number for
            # flatten stub output nodes" on every later call); a fresh cell compiles anew.
            self.step = CompiledStep(self.network)
            self.signatures = set()
            raise

    def warmup(self) -> int:
        """Compile every reachable graph (on the scratch row, touching no sequence); returns how
        many were compiled now."""
        before = self.compiles
        for rows, tokens, window in self.reachable_shapes():
            if (rows, tokens, window) in self.signatures:
                continue
            channels = 2 if self.config.family == "chatglm" else 1
            zeros = np.zeros
            self._run(np.full((rows, tokens), self.config.pad_id), zeros((rows, channels, tokens)),
                      zeros((rows, window)), zeros((rows, tokens)), zeros(rows),
                      self.scratch_row * self.row_len + np.arange(rows * tokens) % self.row_len,
                      np.full(rows, self.scratch_row), zeros(rows))
        return self.compiles - before


class ReferenceRunner:
    """No cache: each step runs the network over every scheduled sequence's whole history (exact, slow)."""

    def __init__(self, network, config):
        self.network, self.config = network, config
        self.histories = {}                   # request_id -> (token ids, positions [channels, n])
        self.prefix = prefix_length(network)
        self.compiles = 0                     # nothing is compiled on this path

    def execute(self, plan: StepPlan) -> dict:
        logits = {}
        for chunk in plan.prefill:
            ids, positions = self.histories.get(chunk.request_id, ([], np.zeros((chunk.positions.shape[0], 0))))
            self.histories[chunk.request_id] = (ids + list(chunk.token_ids),
                                                np.concatenate([positions, chunk.positions], axis=1))
            if chunk.samples:
                logits[chunk.request_id] = self._last_logits(chunk.request_id, chunk.context_length)
        for row in plan.decode:
            ids, positions = self.histories[row.request_id]
            self.histories[row.request_id] = (ids + [row.token_id],
                                              np.concatenate([positions, row.position[:, None]], axis=1))
            logits[row.request_id] = self._last_logits(row.request_id, row.context_length)
        return logits

    def release(self, request_id: str) -> None:
        self.histories.pop(request_id, None)

    def _last_logits(self, request_id: str, context_length: int) -> np.ndarray:
        ids, positions = self.histories[request_id]
        length = len(ids)
        key_valid, query_index, context = shift_mask_inputs(self.prefix, np.ones((1, length)),
                                                            np.arange(length)[None], [context_length])
        out = self.network(int_tensor([ids]), int_tensor(positions[None]), int_tensor(key_valid),
                           int_tensor(query_index), int_tensor(context), None, None, int_tensor([length - 1]))
        return out.asnumpy()[0]

    def warmup(self) -> int:
        return 0
