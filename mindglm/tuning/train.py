"""The train step: batches, the language-model loss, gradients over the adapter only, AdamW.

Gradients come from MindSpore's autograd over `network.trainable_params()` — the adapter's
parameters (LoRA A/B, P-Tuning prefixes); every base weight has requires_grad=False. P-Tuning
trains THUDM's PrefixEncoder through the prefixes it outputs (the chain rule, once per step).
The loss scale (fp16/bf16) seeds the backward pass; mindspore.amp's DynamicLossScaler unscales,
checks and adjusts. The optimizer runs on the host in float32 numpy: adapters are small, and
torch's AdamW, schedules, clipping and accumulation are then a few exact lines each, and its
state is plain arrays that a checkpoint can hold and a resume restores bit for bit.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from mindglm.adapters.dropout import dropout_cells, draw_dropout_masks
from mindglm.adapters.prefix import (EncoderGradients, prefix_leaves, prefix_length, prefixed_mask_inputs,
                                     write_prefixes)
from mindglm.config import ConfigError
from mindglm.models import family_module
from mindglm.quantize import WeightLinear
from mindglm.tuning.data import IGNORE


# ---------------------------------------------------------------------------------- batches
def collate(examples, config, pad_to: Optional[int] = None) -> dict:
    """Right-padded int arrays for the network plus labels; positions per row as at inference."""
    family = family_module(config)
    length = pad_to or max(len(e.input_ids) for e in examples)
    batch = len(examples)
    ids = np.full((batch, length), config.pad_id, np.int64)
    labels = np.full((batch, length), IGNORE, np.int64)
    valid = np.zeros((batch, length), np.int64)
    channels = 2 if config.family == "chatglm" else 1
    positions = np.zeros((batch, channels, length), np.int64)
    context = np.zeros(batch, np.int64)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n], labels[row, :n], valid[row, :n] = example.input_ids, example.labels, 1
        row_positions, row_context = family.prepare_positions(config, np.asarray([example.input_ids]))
        positions[row, :, :n], context[row] = row_positions[0], row_context[0]
    query_index = np.broadcast_to(np.arange(length), (batch, length))
    return {"input_ids": ids, "position_ids": positions, "key_valid": valid, "query_index": query_index,
            "context_lengths": context, "labels": labels}


def network_inputs(batch: dict, prefix: int) -> list:
    """The network's int32 tensors for a collated batch, the mask on the [prefix | tokens] key axis."""
    masks = prefixed_mask_inputs(prefix, batch["key_valid"], batch["query_index"], batch["context_lengths"])
    arrays = (batch["input_ids"], batch["position_ids"]) + masks
    return [Tensor(np.ascontiguousarray(a, np.int32)) for a in arrays]


def cross_entropy(logits, labels):
    """Mean next-token cross-entropy over labels != -100 (torch's CrossEntropyLoss on shifted
    logits/labels, as the reference models compute it), in float32."""
    logits = logits[:, :-1].astype(ms.float32)
    labels = labels[:, 1:]
    keep = labels != IGNORE
    safe = ops.where(keep, labels, ops.zeros_like(labels))
    log_probs = ops.log_softmax(logits, -1)
    picked = ops.gather_elements(log_probs, 2, safe.expand_dims(-1)).squeeze(-1)
    keep = keep.astype(ms.float32)
    return -(picked * keep).sum() / keep.sum()


class LossNetwork(nn.Cell):
    """network inputs + labels -> scalar loss."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def construct(self, input_ids, position_ids, key_valid, query_first, query_last, labels):
        logits = self.network(input_ids, position_ids, key_valid, query_first, query_last)
        return cross_entropy(logits, labels)


class GradStep(nn.Cell):
    """(loss, grads of `params` scaled by `loss_scale`) of a LossNetwork, graph-compiled once per
    batch shape: ~8x faster than PyNative autograd on the tiny test models, same values. The
    loss scale is the backward pass's seed (MindSpore's TrainOneStepWithLossScaleCell does the
    same), so fp16 gradients are scaled from the loss down. The compiled graph reads the
    Parameters' memory: updates must be in place (ops.assign), as `set_data` swaps the memory
    and the graph would keep computing at the old values."""

    def __init__(self, loss_network, params):
        super().__init__()
        self.loss_network = loss_network
        self.weights = ms.ParameterTuple(params)
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)

    @ms.jit
    def construct(self, input_ids, position_ids, key_valid, query_first, query_last, labels, loss_scale):
        loss = self.loss_network(input_ids, position_ids, key_valid, query_first, query_last, labels)
        grads = self.grad(self.loss_network, self.weights)(input_ids, position_ids, key_valid, query_first,
                                                           query_last, labels, loss_scale)
        return loss, grads


# ---------------------------------------------------------------------------------- optimizer
@dataclasses.dataclass
class OptimConfig:
    learning_rate: float = 2e-2
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    warmup_steps: int = 0
    lr_scheduler_type: str = "linear"     # linear | cosine | constant (transformers' names)
    max_grad_norm: float = 1.0             # 0: no clipping
    gradient_accumulation_steps: int = 1
    # Dynamic loss scaling for float16/bfloat16 compute (Ascend): 0 turns it off (float32 needs none).
    # A step whose gradients overflow is skipped and the scale divided by the factor; after
    # loss_scale_window finite steps in a row it is multiplied by it (mindspore.amp.DynamicLossScaler).
    loss_scale_value: float = 0.0
    loss_scale_factor: int = 2
    loss_scale_window: int = 1000


def learning_rate(optim: OptimConfig, step: int, total_steps: int) -> float:
    """transformers' warm-up + linear / cosine schedule at optimizer step `step` (0-based)."""
    if step < optim.warmup_steps:
        return optim.learning_rate * step / max(1, optim.warmup_steps)
    if optim.lr_scheduler_type == "constant":
        return optim.learning_rate
    progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
    if optim.lr_scheduler_type == "cosine":
        return optim.learning_rate * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return optim.learning_rate * max(0.0, 1.0 - progress)


class AdamW:
    """torch.optim.AdamW (decoupled weight decay, bias-corrected), float32, over named arrays."""

    def __init__(self, names, optim: OptimConfig):
        self.optim = optim
        self.step_count = 0
        self.exp_avg = {}
        self.exp_avg_sq = {}
        self.names = list(names)

    def update(self, params: dict, grads: dict, lr: float) -> None:
        """params, grads: {name: float32 array}; params are updated in place."""
        o = self.optim
        self.step_count += 1
        correction1 = 1.0 - o.adam_beta1 ** self.step_count
        correction2 = 1.0 - o.adam_beta2 ** self.step_count
        for name in self.names:
            p, g = params[name], grads[name]
            m = self.exp_avg.setdefault(name, np.zeros_like(p))
            v = self.exp_avg_sq.setdefault(name, np.zeros_like(p))
            p *= np.float32(1.0 - lr * o.weight_decay)
            m *= np.float32(o.adam_beta1)
            m += np.float32(1.0 - o.adam_beta1) * g
            v *= np.float32(o.adam_beta2)
            v += np.float32(1.0 - o.adam_beta2) * g * g
            denom = np.sqrt(v) / np.float32(math.sqrt(correction2)) + np.float32(o.adam_epsilon)
            p -= np.float32(lr / correction1) * m / denom

    def state(self) -> dict:
        return {"step": self.step_count, "exp_avg": {k: v.copy() for k, v in self.exp_avg.items()},
                "exp_avg_sq": {k: v.copy() for k, v in self.exp_avg_sq.items()}}

    def load_state(self, state: dict) -> None:
        self.step_count = int(state["step"])
        self.exp_avg = {k: np.array(v, np.float32) for k, v in state["exp_avg"].items()}
        self.exp_avg_sq = {k: np.array(v, np.float32) for k, v in state["exp_avg_sq"].items()}


def clip_by_global_norm(grads: dict, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_: scale every grad by max_norm / (norm + 1e-6) when above; returns the norm."""
    norm = float(np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values())))
    if max_norm and norm > max_norm:
        scale = np.float32(max_norm / (norm + 1e-6))
        for g in grads.values():
            g *= scale
    return norm


class DataParallel:
    """This process's place among the msrun workers that train one model together (data
    parallelism): each rank runs its share of a step's micro-batches and `sum` adds arrays over
    all ranks (an AllReduce), so every rank applies the same update to the same parameters."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.all_reduce = ops.AllReduce()

    @property
    def is_lead(self) -> bool:
        """Rank 0: the one that logs, evaluates and writes checkpoints."""
        return self.rank == 0

    def share(self, micro_batches: list) -> list:
        """This rank's contiguous share of a step's micro-batches (their number divides by world)."""
        size = len(micro_batches) // self.world
        return micro_batches[self.rank * size:(self.rank + 1) * size]

    def sum(self, vector: np.ndarray) -> np.ndarray:
        return self.all_reduce(Tensor(np.ascontiguousarray(vector, np.float32))).asnumpy()


class Trainer:
    """One optimizer step = `gradient_accumulation_steps` micro-batches of value_and_grad.

    The optimizer trains the network's trainable parameters, or, given `prefix_encoder`, the
    encoder whose output the network's per-layer prefixes are (add_prefix): their gradients are
    carried through it (`EncoderGradients`) and its new output written back after each update.
    Dropout masks are drawn from (seed, step, micro-batch), so a resumed run repeats them.
    With `data_parallel`, this rank's micro-batches are its share of the step's: the gradient
    and loss sums are added over the ranks before the mean, so the step is the one a single
    process takes over all of them (the same mean of micro-batch means as its accumulation,
    the same dropout masks, the same overflow decision)."""

    def __init__(self, network, config, optim: OptimConfig, total_steps: int, prefix_encoder=None, seed: int = 0,
                 data_parallel: Optional[DataParallel] = None):
        self.network, self.config, self.optim, self.total_steps = network, config, optim, total_steps
        self.encoder, self.seed, self.data_parallel = prefix_encoder, seed, data_parallel
        kernel_cells = [path for path, cell in network.cells_and_names()
                        if isinstance(cell, WeightLinear) and cell.backend == "kernels"]
        if kernel_cells:
            raise ConfigError(f"the network's {kernel_cells[0]} runs on mindglm's CPU inference kernels (int8 / int4 / "
                              "float16 weights), which have no gradient: fine-tune a float32 base model (leave out "
                              "quantize / quantization_bit / weight_dtype float16) and quantize the merged result")
        self.leaves = prefix_leaves(network) if prefix_encoder is not None else network.trainable_params()
        if not self.leaves:
            raise ValueError("the network has no trainable parameters: add an adapter (add_lora / add_prefix) first")
        if prefix_encoder is None:
            # Names as the network has them (a cell wrapping the network may prefix the Parameters' own).
            self.names, self.params = [p.name for p in self.leaves], self.leaves
        else:
            self.names, self.params = map(list, zip(*prefix_encoder.parameters_and_names()))
            self.encoder_gradients = EncoderGradients(prefix_encoder)
        self.loss_network = LossNetwork(network)
        self.grad_fn = GradStep(self.loss_network, self.leaves)
        self.adamw = AdamW(self.names, optim)
        self.scaler = None
        if optim.loss_scale_value:
            self.scaler = ms.amp.DynamicLossScaler(optim.loss_scale_value, optim.loss_scale_factor,
                                                   optim.loss_scale_window)
        self.dropouts = dropout_cells(network)
        self.mask_shape = None
        self.step = 0

    def _micro_step(self, batch: dict) -> tuple:
        """(loss, unscaled float32 leaf gradients, whether they are all finite) of one micro-batch."""
        inputs = network_inputs(batch, prefix_length(self.network))
        scale = Tensor(1.0 if self.scaler is None else float(self.scaler.scale_value.asnumpy()), ms.float32)
        # Always in training mode (dropout on): the compiled step keeps the mode it first compiled in.
        self.network.set_train(True)
        try:
            loss, grads = self.grad_fn(*inputs, Tensor(batch["labels"].astype(np.int32)), scale)
        finally:
            self.network.set_train(False)
        finite = True
        if self.scaler is not None:
            grads = self.scaler.unscale(grads)
            finite = bool(ms.amp.all_finite(grads).asnumpy())
        # float32 on the device first: numpy has no bfloat16
        return float(loss.asnumpy()), [g.astype(ms.float32).asnumpy() for g in grads], finite

    def _param_grads(self, leaf_grads: list) -> dict:
        """{name: float32 grad} of the optimized parameters from the leaves' (numpy) gradients."""
        if self.encoder is not None:
            leaf_grads = self.encoder_gradients.of(leaf_grads)
        return dict(zip(self.names, leaf_grads))

    def loss_and_grads(self, batch: dict) -> tuple:
        """(loss, {name: float32 grad}) of one micro-batch (training mode, the dropout masks as last drawn)."""
        loss, grads, _ = self._micro_step(batch)
        return loss, self._param_grads(grads)

    def _draw_masks(self, batch: dict, micro: int) -> None:
        if not self.dropouts:
            return
        shape = batch["input_ids"].shape
        if self.mask_shape not in (None, shape):
            raise ValueError(f"dropout needs every training micro-batch of one shape (a compiled step reads "
                             f"masks of {self.mask_shape}, this batch is {shape}): pad batches to one length")
        self.mask_shape = shape
        draw_dropout_masks(self.dropouts, shape[0], shape[1], self.seed, self.step, micro)

    def train_step(self, micro_batches: list, wants_stop: Optional[Callable[[], bool]] = None) -> dict:
        """Accumulate, clip, update; returns {"loss", "lr", "grad_norm", "tokens", "skipped", "stop"}.
        With loss scaling a step whose gradients overflow changes no parameter ("skipped").
        `wants_stop()`, asked once the micro-batches are done: should this process stop after
        this step? "stop" says whether any rank should (all ranks must run the same number of
        steps, or the others wait in the AllReduce)."""
        total, losses, tokens, finite = None, [], 0, True
        # a rank's micro-batches are the step's from rank * len(share) on: their masks are those
        first = 0 if self.data_parallel is None else self.data_parallel.rank * len(micro_batches)
        for micro, batch in enumerate(micro_batches):
            self._draw_masks(batch, first + micro)
            loss, grads, ok = self._micro_step(batch)
            losses.append(loss)
            tokens += int(batch["key_valid"].sum())
            finite = finite and ok
            if finite:
                total = grads if total is None else [t + g for t, g in zip(total, grads)]
        loss_sum, count, stop = float(np.sum(losses)), len(micro_batches), bool(wants_stop and wants_stop())
        if self.data_parallel is not None:
            total, (loss_sum, count, tokens, stop, finite) = self._sum_over_ranks(
                total, loss_sum, count, tokens, stop, finite)
        if self.scaler is not None:
            self.scaler.adjust(Tensor(finite))
        lr = learning_rate(self.optim, self.step, self.total_steps)
        self.step += 1      # a skipped step still moves the schedule and the data on (torch's GradScaler too)
        result = {"loss": loss_sum / count, "lr": lr, "tokens": tokens, "skipped": not finite,
                  "grad_norm": float("nan"), "stop": stop}
        if not finite:
            return result
        scale = np.float32(1.0 / count)
        total = self._param_grads([g * scale for g in total])
        result["grad_norm"] = clip_by_global_norm(total, self.optim.max_grad_norm)
        values = {n: p.astype(ms.float32).asnumpy() for n, p in zip(self.names, self.params)}
        self.adamw.update(values, total, lr)
        for n, p in zip(self.names, self.params):
            ops.assign(p, Tensor(values[n], p.dtype))
        if self.encoder is not None:
            write_prefixes(self.network, self.encoder)
        return result

    def _sum_over_ranks(self, leaf_grads, loss_sum, count, tokens, stop, finite) -> tuple:
        """(leaf gradients, (loss_sum, count, tokens, stop, finite)) summed over the data-parallel
        ranks in one AllReduce of one flat vector; a rank whose gradients overflowed sends zeros
        and makes every rank skip the step."""
        if leaf_grads is None or not finite:
            leaf_grads = [np.zeros(p.shape, np.float32) for p in self.leaves]
        scalars = [loss_sum, count, tokens, float(stop), float(not finite)]
        summed = self.data_parallel.sum(np.concatenate([g.ravel() for g in leaf_grads] + [np.array(scalars)]))
        out, at = [], 0
        for g in leaf_grads:
            out.append(summed[at:at + g.size].reshape(g.shape))
            at += g.size
        loss_sum, count, tokens, stop, overflowed = (float(v) for v in summed[at:])
        return out, (loss_sum, round(count), round(tokens), stop > 0, overflowed == 0)

    def state(self) -> dict:
        """Everything besides the adapter weights a resume needs, as named numpy arrays."""
        adam = self.adamw.state()
        arrays = {"step": np.array(self.step), "adam_step": np.array(adam["step"])}
        for i, name in enumerate(self.names):
            if name in adam["exp_avg"]:
                arrays[f"m{i}"], arrays[f"v{i}"] = adam["exp_avg"][name], adam["exp_avg_sq"][name]
        if self.scaler is not None:
            arrays["loss_scale"] = self.scaler.scale_value.asnumpy()
            arrays["loss_scale_counter"] = self.scaler.counter.asnumpy()
        return arrays

    def load_state(self, arrays) -> None:
        """Restore `state()`'s arrays (the adapter weights are restored separately)."""
        self.step = int(arrays["step"])
        moments = {"step": int(arrays["adam_step"]), "exp_avg": {}, "exp_avg_sq": {}}
        for i, name in enumerate(self.names):
            if f"m{i}" in arrays:
                moments["exp_avg"][name], moments["exp_avg_sq"][name] = arrays[f"m{i}"], arrays[f"v{i}"]
        self.adamw.load_state(moments)
        if self.scaler is not None and "loss_scale" in arrays:
            ops.assign(self.scaler.scale_value, Tensor(arrays["loss_scale"], ms.float32))
            ops.assign(self.scaler.counter, Tensor(arrays["loss_scale_counter"], ms.int32))

    def evaluate(self, batches: list) -> float:
        """Mean loss over `batches` (eval mode: no dropout)."""
        self.network.set_train(False)
        losses = [float(self.loss_network(*network_inputs(b, prefix_length(self.network)),
                                          Tensor(b["labels"].astype(np.int32))).asnumpy()) for b in batches]
        return float(np.mean(losses))
