"""Loading weights into a built (and rewritten) network: the network is the schema.

Every parameter is found by its path in `parameters_and_names()`; the cell that owns it decides
how a checkpoint tensor fills it. A cell with `load_parameter(local, array, name)` (a quantized
linear layer: quantize, pack, or copy int weights) does it itself and says which of its
parameters it filled; every other parameter is copied, cast once to the parameter's own dtype
(fp16 weights go into fp16 parameters untouched, never through float32).

A cell that loads the parameters of the cells below it (a tensor-parallel layer slicing full
tensors for the local linear layer it wraps, mindglm/parallel/layers.py) names them with
`loaded_parameters()`; they keep the checkpoint's names (the wrapper's path, not the inner one).

Cells whose parameters are runtime state rather than weights (KV caches) declare a
`parameter_group` other than "weights" and are skipped. A `WeightLoader` can take tensors from
several sources (base weights, then adapters) before `finish()` checks nothing is missing.
"""
from __future__ import annotations

import dataclasses
import glob
import os
from typing import Iterable, Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor

from mindglm.checkpoint import CheckpointError
from mindglm.config import ConfigError, GLMConfig

WEIGHTS = "weights"


def parameter_group(cell) -> str:
    """'weights' for checkpoint-loaded parameters; cells holding runtime state say otherwise."""
    return getattr(cell, "parameter_group", WEIGHTS)


def weight_slots(network, group: str = WEIGHTS) -> dict:
    """{parameter path: (owning cell, local name, Parameter)} for the parameters in `group`."""
    slots = {}
    loaders = []  # paths of cells that load the parameters beneath them themselves
    for path, cell in network.cells_and_names():
        if parameter_group(cell) != group or any(path.startswith(p + ".") for p in loaders):
            continue
        if hasattr(cell, "loaded_parameters"):
            loaders.append(path)
            owned = cell.loaded_parameters()
        else:
            owned = cell.parameters_and_names(expand=False)
        for local, param in owned:
            slots[f"{path}.{local}" if path else local] = (cell, local, param)
    return slots


class WeightLoader:
    """Fills a network's weights from one or more sources of (mindglm name, numpy array)."""

    def __init__(self, network):
        self.network = network
        self.slots = weight_slots(network)
        self.filled = set()

    def load(self, tensors: Iterable, source: str) -> None:
        family = getattr(getattr(self.network, "config", None), "family", "this")
        for name, array in tensors:
            slot = self.slots.get(name)
            if slot is None:
                raise ConfigError(f"{source}: tensor '{name}' has no place in the {family} network; "
                                  "is the checkpoint for another model family or size?")
            cell, local, param = slot
            prefix = name[: len(name) - len(local)]
            try:
                done = fill_parameter(cell, local, param, array, name)
            except CheckpointError as exc:
                raise CheckpointError(f"{source}: {exc}") from None
            self.filled.update(prefix + d for d in done)

    def missing(self) -> list:
        return sorted(set(self.slots) - self.filled)

    def finish(self, source: str) -> None:
        """Every weight must have been filled by some source."""
        missing = self.missing()
        if missing:
            listed = ", ".join(f"'{name}'" for name in missing[:3]) + (" and others" if len(missing) > 3 else "")
            raise ConfigError(f"{source}: checkpoint lacks {len(missing)} tensor(s) ({listed}); "
                              "it is incomplete or for another model")


def fill_parameter(cell, local: str, param, array: np.ndarray, name: str) -> list:
    """Fill `cell`'s parameter `local` from checkpoint tensor `name`: through the cell's own
    `load_parameter` when it has one, else a copy. Returns the local names it filled."""
    if hasattr(cell, "load_parameter"):
        return cell.load_parameter(local, array, name)
    copy_into(param, array, name)
    return [local]


def copy_into(param, array: np.ndarray, name: str, source: str = None) -> None:
    """Fill `param` (same shape) from `array`, converted once to the parameter's dtype."""
    if tuple(array.shape) != tuple(param.shape):
        where = f"{source}: " if source else ""
        raise CheckpointError(f"{where}tensor '{name}' has shape {tuple(array.shape)}, the config says "
                              f"{tuple(param.shape)}: the checkpoint and the model config disagree")
    param.set_data(parameter_data(array, param.dtype))


def parameter_data(array: np.ndarray, dtype) -> Tensor:
    """`array` as a parameter's data in `dtype`. An array that owns its memory, writable and already
    in that dtype, is adopted instead of copied: the 6B model's two 532 MB vocabulary tables were
    each held twice while loading (peak RSS 508 MB above the loaded model). So the array is the
    weight from then on: pass a copy to keep one of your own. Views (of a memory-mapped file, of a
    reusable buffer) and other dtypes are copied."""
    array = np.ascontiguousarray(array)
    if array.flags.owndata and array.flags.writeable and array.dtype == _ADOPTABLE.get(dtype):
        return Tensor.from_numpy(array)
    return Tensor(array, dtype)


_ADOPTABLE = {ms.float32: np.float32, ms.float16: np.float16, ms.int8: np.int8}  # numpy has no bfloat16


def load_weights(network, tensors, source: str, partial: bool = False) -> WeightLoader:
    """Load (name, array) pairs into `network`; unless `partial`, every weight must be present."""
    loader = WeightLoader(network)
    loader.load(tensors, source)
    if not partial:
        loader.finish(source)
    return loader


# ---------------------------------------------------------------------------------- build order
QUANTIZE = {"int8": {"quantization_bit": 8}, "int4": {"quantization_bit": 4}, "fp16": {"weight_dtype": "float16"}}


def with_quantize(config: GLMConfig, quantize: Optional[str]) -> GLMConfig:
    """`config` with the weight format of load_model's `quantize` ("int8", "int4", "fp16", None)."""
    if quantize is None:
        return config
    if quantize not in QUANTIZE:
        raise ConfigError(f"quantize={quantize!r}: expected one of {', '.join(QUANTIZE)} (or None)")
    return dataclasses.replace(config, **QUANTIZE[quantize])


def resolve_source(source: Optional[str]) -> str:
    """The weights to read: a .ckpt, or a THUDM dir (whose single converted .ckpt wins)."""
    if source is None:
        raise ConfigError("no checkpoint given; convert THUDM weights with "
                          "`python -m ckpt_convert --src <HF dir> --dst model.ckpt` and pass it as the checkpoint")
    if not os.path.exists(source):
        raise ConfigError(f"checkpoint {source} does not exist; convert one with "
                          "`python -m ckpt_convert --src <THUDM dir> --dst model.ckpt`")
    if os.path.isdir(source):
        ckpts = sorted(glob.glob(os.path.join(source, "*.ckpt")))
        if len(ckpts) == 1:
            return ckpts[0]
    return source


def adopt_stored_format(config: GLMConfig, bits: int, output_quantized: bool, source: str) -> GLMConfig:
    """The model config, quantized like the checkpoint when the config does not say otherwise.

    A quantized checkpoint cannot become a float model or another bit width (its fp weights are
    gone); float weights can always be quantized on load."""
    if not bits:
        return config
    if config.quantization_bit and config.quantization_bit != bits:
        raise ConfigError(f"{source} holds int{bits} weights but the model is configured for "
                          f"int{config.quantization_bit}: requantizing loses accuracy twice; quantize from the "
                          "fp weights instead (`python -m ckpt_convert --quantize ...`) or drop quantization_bit")
    return dataclasses.replace(config, quantization_bit=bits,
                               quantize_output=config.quantize_output or output_quantized)


def build_rewritten_network(config: GLMConfig, parallel=None):
    """`config`'s network with zero weights, rewritten for its weight format and, given a
    ParallelContext, for this rank's tensor-parallel share (built from the local-size view)."""
    from mindglm.models import family_module
    from mindglm.quantize import quantize_network

    if parallel is None:
        network = family_module(config).build_network(config)
        quantize_network(network, config)
        return network
    from mindglm.parallel.sharding import local_view, shard_network
    network = family_module(config).build_network(local_view(config, parallel.world))
    quantize_network(network, config)
    shard_network(network, config, parallel.rank, parallel.world)
    return network


def build_loaded_network(config: GLMConfig, source: Optional[str], parallel=None):
    """(network, config): build `config`'s network, rewrite its Linear cells for the weight format
    (and, given a ParallelContext, for this rank's tensor-parallel share), then load the weights
    of `source` into it (gpt-fast's build -> rewrite -> load order)."""
    from mindglm.io.tensors import to_numpy
    from mindglm.io.weights import _Conversion

    source = resolve_source(source)
    conversion = _Conversion(source, config, need_config=True)
    config = adopt_stored_format(config, conversion.bits, conversion.output_quantized, source)
    network = build_rewritten_network(config, parallel)
    # Float weights of an int layer are quantized in the stream, from whole rows, before any
    # rank slices them: a row-parallel shard gets the scale of the full row, as one process does.
    # A rank takes the other tensors memory-mapped where the file allows, so it reads only the
    # slices it keeps (and the replicated tensors) instead of every full tensor.
    tensors = conversion.stream(bits=config.quantization_bit, quantize_output=config.quantize_output,
                                mapped=parallel is not None)
    load_weights(network, ((name, to_numpy(array)) for name, array in tensors), source)
    return network, config
