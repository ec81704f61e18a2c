"""Dropout whose masks the trainer draws on the host, from (seed, optimizer step, micro-batch).

MindSpore's Dropout keeps its random state inside the compiled kernel, where no checkpoint can
reach it, and the generator-driven ops that could be reseeded have no CPU kernels. Drawing the
keep-masks on the host from a counter-based seed makes every step's masks a function of the
step number alone: `--resume` regenerates exactly the masks the uninterrupted run used.
"""
from __future__ import annotations

import numpy as np
from mindspore import Parameter, Tensor, nn, ops


class MaskedDropout(nn.Cell):
    """In training x * mask, mask = keep / (1 - p) with keep ~ Bernoulli(1 - p) (torch's dropout);
    identity in eval mode. The mask covers x's leading `leading` dims (batch, or batch x tokens)
    followed by `tail`; `draw_dropout_masks` fills it before each training micro-batch."""

    parameter_group = "adapter"  # runtime state, not weights: mindglm/loading.py skips it

    def __init__(self, p: float, tail: tuple, leading: int):
        super().__init__()
        if not 0.0 < p < 1.0:
            raise ValueError(f"dropout probability must be in (0, 1), got {p}")
        self.p, self.tail, self.leading = float(p), tuple(tail), leading
        self.mask = Parameter(np.ones((1,) * leading + self.tail, np.float32), name="mask", requires_grad=False)

    def construct(self, x):
        if not self.training:
            return x
        return x * self.mask.astype(x.dtype)

    def mask_shape(self, batch: int, length: int) -> tuple:
        return (batch, length)[: self.leading] + self.tail


def dropout_cells(network) -> list:
    """Every MaskedDropout of `network`, in cell order (the order masks are drawn in)."""
    return [cell for _, cell in network.cells_and_names() if isinstance(cell, MaskedDropout)]


def draw_dropout_masks(cells, batch: int, length: int, seed: int, step: int, micro: int) -> None:
    """Fill every cell's mask for micro-batch `micro` of optimizer step `step` ([batch, length]
    tokens), from a generator seeded by (seed, step, micro) only. In place (ops.assign): a
    compiled train step reads the masks' memory, which set_data would replace."""
    rng = np.random.default_rng([seed, step, micro])
    for cell in cells:
        shape = cell.mask_shape(batch, length)
        keep = rng.random(shape) < 1.0 - cell.p
        mask = Tensor(keep.astype(np.float32) * np.float32(1.0 / (1.0 - cell.p)))
        if tuple(cell.mask.shape) == shape:
            ops.assign(cell.mask, mask)
        else:   # first draw, before the train step first compiles (the trainer keeps one shape)
            cell.mask.set_data(mask)
