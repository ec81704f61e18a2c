"""Replace cells inside a built network, keeping parameter names right.

Quantization (and later LoRA and tensor parallelism) are rewrites of a built network, applied
before its weights are loaded (gpt-fast's order: build -> rewrite -> load). MindSpore 2.10 names
a Parameter once, when the network is built: a cell assigned afterwards gets names such as
`qkv.weight` (its attribute name alone) instead of `layers.0.attention.qkv.weight`, so
`get_parameters()` and checkpoint saving would see clashing names (`parameters_and_names()`
still walks the right paths). `replace_cell` renames the new cell's parameters to its path.
"""
from __future__ import annotations

from typing import Callable, Optional

from mindspore import nn


def _parent(network: nn.Cell, path: str):
    parent_path, _, attr = path.rpartition(".")
    cells = dict(network.cells_and_names())
    if path not in cells:
        raise KeyError(f"the network has no cell at '{path}'")
    return (cells[parent_path] if parent_path else network), attr


def replace_cell(network: nn.Cell, path: str, new_cell: nn.Cell) -> nn.Cell:
    """Put `new_cell` at `path` (e.g. 'layers.0.attention.qkv'); return the cell it replaced."""
    parent, attr = _parent(network, path)
    if isinstance(parent, (nn.CellList, nn.SequentialCell)) and attr.isdigit():
        old = parent[int(attr)]
        parent[int(attr)] = new_cell
    else:
        old = getattr(parent, attr)
        setattr(parent, attr, new_cell)
    new_cell.update_parameters_name(path + ".")
    return old


def replace_cells(network: nn.Cell, make: Callable[[str, nn.Cell], Optional[nn.Cell]]) -> list:
    """Replace every cell for which `make(path, cell)` returns a new one; return the paths replaced.

    The walk is taken before anything changes, so a replacement's own children are not visited.
    """
    chosen = [(path, new) for path, cell in list(network.cells_and_names()) if path
              for new in [make(path, cell)] if new is not None]
    for path, new in chosen:
        replace_cell(network, path, new)
    return [path for path, _ in chosen]
