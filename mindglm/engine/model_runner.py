"""Model runners: turn a StepPlan into next-token logits, one row of logits per sampled sequence.

`ModelRunner` owns the KV cache pool and the compiled graphs. Every call is one graph keyed by
(rows, tokens, window) buckets. A step's prefill chunks are packed into as few calls as they
fit: one row of `tokens` (padded to a token bucket) holds several sequences' chunks back to
back, each token's key/value goes to its own sequence's cache row, and each query sees only its
own sequence's keys (the row's key axis lists every packed sequence's slots in turn, and
query_first/query_last bound each query to its own). So eight short prompts cost one call over
their real tokens, not eight calls each padded to a bucket. A decode step is every decoding row
at once (padded to a row bucket), and on a KernelStackStep network up to engine.decode_steps
greedy steps of it in one call (DecodeSteps; the key's fourth element). The window is the
smallest window bucket that holds the keys read. `warmup()` compiles every reachable key once;
after it no workload compiles anything more.

`ReferenceRunner` is the exact path (use_past: false): no cache, every step runs the network
over each sequence's whole history in PyNative.

A P-Tuning network (mindglm/adapters/prefix.py) has P prefix keys ahead of every row's tokens:
the ModelRunner's rows are P slots longer, the prefix fills slots [0, P) once, and token t of a
row lives at slot P + t; the ReferenceRunner shifts its mask inputs the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from mindglm.adapters.prefix import fill_prefix_slots, prefix_length, prefixed_mask_inputs
from mindglm.engine.config import EngineConfig, bucket_for, powers_of_two_up_to
from mindglm.engine.scheduler import StepPlan
from mindglm.fused import KernelStackStep, fuse_blocks, rounded_head, stackable
from mindglm.models.layers import last_visible_key

# Most sequences one prefill call packs: its graph returns this many rows of logits.
MAX_PACKED = 8


@dataclass
class DecodeSteps:
    """One row's logits of several greedy decode steps in one call (EngineConfig.decode_steps):
    logits [steps, vocab] and fed [steps], the token each step was fed (fed[0] the row's own,
    then the argmax of the step before). Step k's logits are the row's next ones only if its
    sampler chose fed[k] at step k - 1 (Engine keeps them while it does). Through a float32 output
    layer's bfloat16 copy (KernelStackStep's rounded_head) a step's logits are exact wherever they
    could be the largest and approximations below the largest elsewhere: for a greedy sampler."""

    logits: np.ndarray
    fed: np.ndarray


def int_tensor(array) -> Tensor:
    """An int32 copy of `array` as a Tensor sharing the copy's memory (Tensor(array) would copy it
    again: 8 step inputs took 0.20 ms that way, 0.04 ms this way)."""
    return Tensor.from_numpy(np.array(array, dtype=np.int32, order="C"))


class CompiledStep(nn.Cell):
    """The network with its KV cache behind one graph-compiled call (logits of the tokens asked for)."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    @ms.jit
    def construct(self, input_ids, position_ids, key_valid, query_first, query_last, slot_mapping, kv_slots,
                  logits_index):
        return self.network(input_ids, position_ids, key_valid, query_first, query_last, slot_mapping, kv_slots,
                            logits_index)


class ModelRunner:
    """The cache pool (`max_num_seqs` rows + one scratch row for padding) and its compiled graphs."""

    def __init__(self, network, config, engine_config: EngineConfig, max_model_len: int):
        self.network, self.config = network, config
        self.rows = engine_config.max_num_seqs
        self.max_len = max_model_len
        self.prefix = prefix_length(network)  # P-Tuning's prefix slots at the head of every row
        self.row_len = self.prefix + max_model_len
        self.scratch_row = self.rows          # padding tokens write here, never read
        self.packed = min(self.rows, MAX_PACKED)
        chunk = min(engine_config.chunk_size, max_model_len)
        # GLM v1 prefills its (bidirectional) context whole, so its prompts need buckets up to the row.
        longest_prefill = max_model_len if config.family == "chatglm" else chunk
        self.token_buckets = sorted({b for b in config.prefill_buckets if b < longest_prefill} | {longest_prefill})
        # Windows in token terms, plus the prefix every row starts with.
        self.window_buckets = [self.prefix + b for b in sorted(
            {b for b in config.prefill_buckets if b < max_model_len} | {max_model_len} | set(self.token_buckets))]
        self.row_buckets = powers_of_two_up_to(self.rows)
        self.chunk = chunk
        self.prefill_keys = {(1, tokens, self._window_for(tokens)) for tokens in self.token_buckets}
        if self.config.family != "chatglm":      # GLM v1 prefills in one chunk (see Scheduler)
            self.prefill_keys |= {(1, chunk, window) for window in self.window_buckets}
        network.setup_caches(self.rows + 1, self.row_len)
        fill_prefix_slots(network)
        # The cached step is compiled from the network as it is now (loaded, adapters applied): its
        # last rewrite turns the blocks whose cells all run on the CPU kernels into fused ones, and
        # a network of fused blocks alone steps through all its layers in one kernel call.
        fuse_blocks(network)
        self.step_kind = KernelStackStep if stackable(network) else CompiledStep
        # greedy decode steps one call may take (only the one-call network step can), through a
        # bfloat16 copy of a float32 output layer when there are several (KernelStackStep)
        self.decode_steps = engine_config.decode_steps if self.step_kind is KernelStackStep else 1
        self.rounded_head = rounded_head(network) if self.decode_steps > 1 else None
        self.step = self._new_step()
        self.signatures = set()               # (rows, tokens, window, steps) of each graph compiled
        self.compiles = 0

    # ------------------------------------------------------------------ buckets
    def _window_for(self, tokens: int) -> int:
        return bucket_for(self.prefix + tokens, self.window_buckets)

    def logit_rows(self, rows: int, tokens: int) -> int:
        """Rows of logits a graph returns: one per decoding row, `packed` for a prefill call."""
        return rows if tokens == 1 else self.packed

    def call_shape(self, chunks) -> "tuple | None":
        """(tokens, window) of one prefill call packing `chunks`, or None if they do not fit one.

        The call's tokens are the chunks' tokens back to back, its keys every chunk's sequence
        from slot 0 to the chunk's end. Its graph is (1, token bucket, that bucket's window)
        when the keys fit there (first chunks), else (1, chunk size, window of the keys) — a
        later chunk reads its sequence's earlier slots too —, and only keys warmup() compiles."""
        tokens = sum(len(c.token_ids) for c in chunks)
        keys = sum(self.prefix + c.start + len(c.token_ids) for c in chunks)
        if tokens > self.token_buckets[-1] or keys > self.window_buckets[-1]:
            return None
        bucket = bucket_for(tokens, self.token_buckets)
        shape = (bucket, self._window_for(bucket)) if keys <= self._window_for(bucket) else \
            (self.chunk, bucket_for(keys, self.window_buckets))
        if (1,) + shape not in self.prefill_keys or len(chunks) > self.logit_rows(1, shape[0]):
            return None
        return shape

    def reachable_shapes(self) -> list:
        """Every (rows, tokens, window, steps) key a workload can need, prefill and decode."""
        keys = {key + (1,) for key in self.prefill_keys}
        for rows in self.row_buckets:
            for window in self.window_buckets:
                keys |= {(rows, 1, window, steps) for steps in {1, self.decode_steps}}
        return sorted(keys)

    # ------------------------------------------------------------------ execution
    def execute(self, plan: StepPlan) -> dict:
        """Run a plan: {request_id: float32 logits [vocab]} for every chunk that ends its prompt
        and every decode row."""
        logits = {}
        for call in self.pack(plan.prefill):
            logits.update(self._prefill(call))
        if plan.decode:
            steps = min(plan.decode_steps, self.decode_steps)
            for row, row_logits in zip(plan.decode, self._decode(plan.decode, steps)):
                logits[row.request_id] = row_logits
        return logits

    def pack(self, chunks) -> list:
        """The step's prefill chunks as calls, in order, each holding as many as fit (call_shape)."""
        calls = []
        for chunk in chunks:
            if calls and self.call_shape(calls[-1] + [chunk]) is not None:
                calls[-1].append(chunk)
            else:
                calls.append([chunk])
        return calls

    def _prefill(self, chunks) -> dict:
        tokens, window = self.call_shape(chunks)
        channels = chunks[0].positions.shape[0]
        ids = np.full((1, tokens), self.config.pad_id)
        positions = np.zeros((1, channels, tokens))
        slots = self.scratch_row * self.row_len + np.arange(tokens)
        kv_slots = self.scratch_row * self.row_len + np.arange(window)
        query_first, query_last = np.zeros(tokens), np.zeros(tokens)
        logits_index, sampled = np.zeros(self.logit_rows(1, tokens)), []
        t = k = 0                                      # the next token and key of the call
        for chunk in chunks:
            n = len(chunk.token_ids)
            first, end = self.prefix + chunk.start, self.prefix + chunk.start + n   # row slots written
            row_slot = chunk.row * self.row_len
            ids[0, t:t + n] = chunk.token_ids
            positions[0, :, t:t + n] = chunk.positions
            slots[t:t + n] = row_slot + np.arange(first, end)
            kv_slots[k:k + end] = row_slot + np.arange(end)       # the sequence's keys: slots 0..end-1
            query_first[t:t + n] = k
            query_last[t:t + n] = k + last_visible_key(np.arange(first, end), self.prefix + chunk.context_length)
            if chunk.samples:
                logits_index[len(sampled)] = t + n - 1
                sampled.append(chunk.request_id)
            t, k = t + n, k + end
        query_last[t:] = k - 1                         # padding queries: any real key (no empty softmax)
        key_valid = np.arange(window) < k
        out = self._run(ids, positions, key_valid[None], query_first[None], query_last[None], slots,
                        kv_slots[None], logits_index)
        return {request_id: out[i] for i, request_id in enumerate(sampled)}

    def _decode(self, decode_rows, steps: int = 1) -> list:
        """Each row's logits [vocab] (steps 1) or DecodeSteps, in order."""
        count = len(decode_rows)
        rows = bucket_for(count, self.row_buckets)
        window = bucket_for(self.prefix + max(r.slot for r in decode_rows) + steps, self.window_buckets)
        arrays = self._decode_inputs(rows, window, decode_rows[0].position.shape[0])
        ids, positions, key_valid, query_last, slots, kv_slots = arrays
        for b, row in enumerate(decode_rows):
            slot = self.prefix + row.slot
            ids[b, 0] = row.token_id
            positions[b, :, 0] = row.position
            key_valid[b, : slot + 1] = 1
            query_last[b, 0] = last_visible_key(slot, self.prefix + row.context_length)
            slots[b] = row.row * self.row_len + slot
            kv_slots[b] = row.row * self.row_len + np.arange(window)
        out = self._decode_call(arrays, steps)
        if steps == 1:
            return list(out[:count])
        logits, fed = out
        logits = logits.reshape(steps, rows, -1)
        return [DecodeSteps(logits[:, b], fed[:, b].astype(np.int64)) for b in range(count)]

    def _decode_inputs(self, rows: int, window: int, channels: int) -> list:
        """A decode call's ids, positions, key_valid, query_last, slot_mapping and kv_slots with
        every row padding: it reads and writes the scratch row from its slot 0 on, so that a call
        of several steps finds each step's slot where its mask admits it."""
        scratch = self.scratch_row * self.row_len
        return [np.full((rows, 1), self.config.pad_id), np.zeros((rows, channels, 1)), np.zeros((rows, window)),
                np.zeros((rows, 1)), np.full(rows, scratch), np.full((rows, 1), scratch) + np.arange(window)]

    def _decode_call(self, arrays, steps: int):
        """Run a decode call of `steps` steps on _decode_inputs' arrays (filled in)."""
        ids, positions, key_valid, query_last, slots, kv_slots = arrays
        rows = ids.shape[0]
        logits_index = np.arange(rows) if steps == 1 else np.tile(np.arange(rows), (steps, 1))
        return self._run(ids, positions, key_valid, np.zeros((rows, 1)), query_last, slots, kv_slots, logits_index)

    def release(self, request_id: str) -> None:
        """Nothing to do: a freed row's stale slots are never admitted by the mask."""

    def _run(self, *arrays):
        """The step's logits, or (logits, fed) of a call of several decode steps (KernelStackStep)."""
        ids, key_valid, logits_index = arrays[0], arrays[2], arrays[-1]
        steps = logits_index.shape[0] if logits_index.ndim == 2 else 1
        key = (ids.shape[0], ids.shape[1], key_valid.shape[1], steps)  # the logits' rows follow (logit_rows)
        if key not in self.signatures:
            self.signatures.add(key)
            self.compiles += 1
        try:
            out = self.step(*(int_tensor(a) for a in arrays))
            return tuple(o.asnumpy() for o in out) if isinstance(out, tuple) else out.asnumpy()
        except Exception:
            # MindSpore leaves a compiled graph that raised unusable ("Invalid output number for
            # flatten stub output nodes" on every later call); a fresh cell compiles anew.
            self.step = self._new_step()
            self.signatures = set()
            raise

    def _new_step(self):
        """The cached step's cell (a fresh one compiles anew)."""
        if self.step_kind is KernelStackStep:
            return KernelStackStep(self.network, self.rounded_head)
        return CompiledStep(self.network)

    def warmup(self) -> int:
        """Compile every reachable graph (on the scratch row, touching no sequence); returns how
        many were compiled now."""
        before = self.compiles
        channels = 2 if self.config.family == "chatglm" else 1
        scratch = self.scratch_row * self.row_len
        for rows, tokens, window, steps in self.reachable_shapes():
            if (rows, tokens, window, steps) in self.signatures:
                continue
            if tokens == 1:
                self._decode_call(self._decode_inputs(rows, window, channels), steps)
                continue
            zeros = np.zeros
            self._run(np.full((rows, tokens), self.config.pad_id), zeros((rows, channels, tokens)),
                      zeros((rows, window)), zeros((rows, tokens)), zeros((rows, tokens)),
                      scratch + np.arange(rows * tokens) % self.row_len,
                      scratch + np.arange(rows * window).reshape(rows, window) % self.row_len,
                      zeros(self.logit_rows(rows, tokens)))
        return self.compiles - before


class ReferenceRunner:
    """No cache: each step runs the network over every scheduled sequence's whole history (exact, slow)."""

    def __init__(self, network, config):
        self.network, self.config = network, config
        self.histories = {}                   # request_id -> (token ids, positions [channels, n])
        self.prefix = prefix_length(network)
        self.compiles = 0                     # nothing is compiled on this path
        self.decode_steps = 1                 # one step a call (EngineConfig.decode_steps)

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
        masks = prefixed_mask_inputs(self.prefix, np.ones((1, length)), np.arange(length)[None], [context_length])
        out = self.network(int_tensor([ids]), int_tensor(positions[None]), *(int_tensor(a) for a in masks),
                           None, None, int_tensor([length - 1]))
        return out.asnumpy()[0]

    def warmup(self) -> int:
        return 0
