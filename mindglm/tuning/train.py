"""The train step: batches, the language-model loss, gradients over the adapter only, AdamW.

Gradients come from MindSpore's `value_and_grad` over `network.trainable_params()` — the
adapter's parameters (LoRA A/B, P-Tuning prefixes); every base weight has requires_grad=False.
The optimizer runs on the host in float32 numpy: adapters are small, and torch's AdamW,
schedules, clipping and accumulation are then a few exact lines each, and its state is plain
arrays that a checkpoint can hold and a resume restores bit for bit.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from mindglm.adapters.prefix import prefix_length, shift_mask_inputs
from mindglm.models import family_module
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
    key_valid, query_index, context = shift_mask_inputs(prefix, batch["key_valid"], batch["query_index"],
                                                        batch["context_lengths"])
    arrays = (batch["input_ids"], batch["position_ids"], key_valid, query_index, context)
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

    def construct(self, input_ids, position_ids, key_valid, query_index, context_lengths, labels):
        logits = self.network(input_ids, position_ids, key_valid, query_index, context_lengths)
        return cross_entropy(logits, labels)


class GradStep(nn.Cell):
    """(loss, grads of `params`) of a LossNetwork, graph-compiled once per batch shape: ~8x
    faster than PyNative autograd on the tiny test models, same values. The compiled graph
    reads the Parameters' memory: updates must be in place (ops.assign), as `set_data` swaps
    the memory and the graph would keep computing at the old values."""

    def __init__(self, loss_network, params):
        super().__init__()
        self.loss_network = loss_network
        self.weights = ms.ParameterTuple(params)
        self.grad = ops.GradOperation(get_by_list=True)

    @ms.jit
    def construct(self, input_ids, position_ids, key_valid, query_index, context_lengths, labels):
        loss = self.loss_network(input_ids, position_ids, key_valid, query_index, context_lengths, labels)
        grads = self.grad(self.loss_network, self.weights)(input_ids, position_ids, key_valid, query_index,
                                                           context_lengths, labels)
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

    With `data_parallel`, this rank's micro-batches are its share of the step's: the gradient
    and loss sums are added over the ranks before the mean, so the step is the one a single
    process takes over all of them (the same mean of micro-batch means as its accumulation)."""

    def __init__(self, network, config, optim: OptimConfig, total_steps: int,
                 data_parallel: Optional[DataParallel] = None):
        self.network, self.config, self.optim, self.total_steps = network, config, optim, total_steps
        self.data_parallel = data_parallel
        self.params = network.trainable_params()
        if not self.params:
            raise ValueError("the network has no trainable parameters: add an adapter (add_lora / add_prefix) first")
        # Names as the network has them (a cell wrapping the network may prefix the Parameters' own).
        self.names = [p.name for p in self.params]
        self.loss_network = LossNetwork(network)
        self.grad_fn = GradStep(self.loss_network, self.params)
        self.adamw = AdamW(self.names, optim)
        self.step = 0

    def loss_and_grads(self, batch: dict) -> tuple:
        """(loss, {name: float32 grad}) of one micro-batch."""
        inputs = network_inputs(batch, prefix_length(self.network))
        loss, grads = self.grad_fn(*inputs, Tensor(batch["labels"].astype(np.int32)))
        return float(loss.asnumpy()), {n: g.asnumpy().astype(np.float32) for n, g in zip(self.names, grads)}

    def train_step(self, micro_batches: list, wants_stop: Optional[Callable[[], bool]] = None) -> dict:
        """Accumulate, clip, update; returns {"loss", "lr", "grad_norm", "tokens", "stop"}.
        `wants_stop()`, asked once the micro-batches are done: should this process stop after
        this step? "stop" says whether any rank should (all ranks must run the same number of
        steps, or the others wait in the AllReduce)."""
        self.network.set_train(True)
        total, losses, tokens = None, [], 0
        for batch in micro_batches:
            loss, grads = self.loss_and_grads(batch)
            losses.append(loss)
            tokens += int(batch["key_valid"].sum())
            total = grads if total is None else {n: total[n] + grads[n] for n in total}
        loss_sum, count = float(np.sum(losses)), len(micro_batches)
        stop = bool(wants_stop and wants_stop())
        if self.data_parallel is not None:
            total, (loss_sum, count, tokens, stop) = self._sum_over_ranks(total, loss_sum, count, tokens, stop)
        scale = np.float32(1.0 / count)
        total = {n: g * scale for n, g in total.items()}
        norm = clip_by_global_norm(total, self.optim.max_grad_norm)
        lr = learning_rate(self.optim, self.step, self.total_steps)
        values = {n: p.asnumpy().astype(np.float32) for n, p in zip(self.names, self.params)}
        self.adamw.update(values, total, lr)
        for n, p in zip(self.names, self.params):
            ops.assign(p, Tensor(values[n], p.dtype))
        self.step += 1
        self.network.set_train(False)
        return {"loss": loss_sum / count, "lr": lr, "grad_norm": norm, "tokens": tokens, "stop": bool(stop)}

    def _sum_over_ranks(self, grads: dict, *scalars) -> tuple:
        """(grads, scalars) summed over the data-parallel ranks in one AllReduce of one flat vector."""
        flat = np.concatenate([grads[n].ravel() for n in self.names] + [np.array(scalars, np.float32)])
        summed = self.data_parallel.sum(flat)
        out, at = {}, 0
        for n in self.names:
            size = grads[n].size
            out[n] = summed[at:at + size].reshape(grads[n].shape)
            at += size
        loss_sum, count, tokens, stop = (float(v) for v in summed[at:])
        return out, (loss_sum, round(count), round(tokens), stop > 0)

    def evaluate(self, batches: list) -> float:
        """Mean loss over `batches` (eval mode: no dropout)."""
        self.network.set_train(False)
        losses = [float(self.loss_network(*network_inputs(b, prefix_length(self.network)),
                                          Tensor(b["labels"].astype(np.int32))).asnumpy()) for b in batches]
        return float(np.mean(losses))
