"""Joining the ranks an `msrun` launch started: one process per device, one tensor-parallel group.

`set_auto_parallel_context(parallel_mode="semi_auto_parallel")` refuses CPU, so mindglm writes
its parallelism with explicit collectives (mindglm/parallel/layers.py): the same code runs on
CPU (MindSpore's own collectives), GPU (NCCL) and Ascend (HCCL). Everything a user can get
wrong is checked before any rank waits on another: the launch (msrun's environment), the world
size against `tensor_parallel`, the model's sizes against it (sharding.check_tensor_parallel);
the cluster's start is bounded by `start_timeout` (MS_TOPO_TIMEOUT) instead of msrun's 600 s.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np

from mindglm.config import ConfigError

DEFAULT_START_TIMEOUT = 120  # seconds the ranks wait for each other at start


@dataclass
class ParallelConfig:
    """YAML section `parallel:`. tensor_parallel: devices (msrun workers) one model spans;
    start_timeout: seconds the ranks wait for each other when they start."""

    tensor_parallel: int = 1
    start_timeout: int = DEFAULT_START_TIMEOUT

    def __post_init__(self):
        for name in ("tensor_parallel", "start_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"parallel setting '{name}' must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ParallelContext:
    """This process's place in the tensor-parallel group; `seed_entropy` is the same on every
    rank (drawn by rank 0), so requests without a seed sample identically everywhere."""

    rank: int
    world: int
    seed_entropy: int

    @property
    def is_lead(self) -> bool:
        """Rank 0: the one that talks to the console, files and HTTP clients."""
        return self.rank == 0


def launch_hint(world: int) -> str:
    return (f"launch one process per device with msrun, e.g. `msrun --worker_num={world} "
            f"--local_worker_num={world} --master_port=8118 --join=True run_chat.py ...`")


def launched_world() -> int:
    """How many workers msrun started (0: not started by msrun)."""
    if os.environ.get("MS_ROLE") not in ("MS_WORKER", "MS_SCHED"):
        return 0
    return int(os.environ.get("MS_WORKER_NUM") or os.environ.get("RANK_SIZE") or 0)


def launched_rank() -> int:
    """This worker's rank as msrun numbers it (0 outside msrun)."""
    return int(os.environ.get("RANK_ID") or os.environ.get("MS_NODE_ID") or 0)


def check_launch(tensor_parallel: int) -> None:
    """A ConfigError unless this process is one of exactly `tensor_parallel` msrun workers."""
    world = launched_world()
    if world == 0:
        raise ConfigError(f"tensor_parallel {tensor_parallel} runs one process per device, but this process was "
                          f"not started by msrun: {launch_hint(tensor_parallel)}")
    if world != tensor_parallel:
        raise ConfigError(f"tensor_parallel is {tensor_parallel} but msrun started {world} processes: pass "
                          f"--worker_num={tensor_parallel} --local_worker_num={tensor_parallel} to msrun, or set "
                          f"parallel.tensor_parallel to {world}")


def init_tensor_parallel(tensor_parallel: int, start_timeout: int = DEFAULT_START_TIMEOUT) -> ParallelContext:
    """Join the msrun-launched group (once per process) and return this rank's context."""
    check_launch(tensor_parallel)
    from mindspore.communication import get_group_size, get_rank, init
    from mindspore.communication.management import GlobalComm

    if not GlobalComm.INITED:
        # Read by MindSpore's cluster when it starts: a missing or dead rank fails the others after
        # this long instead of msrun's 600 s.
        os.environ["MS_TOPO_TIMEOUT"] = str(int(start_timeout))
        os.environ.setdefault("HCCL_CONNECT_TIMEOUT", str(int(start_timeout)))
        init()
        if os.environ.get("MS_ROLE") == "MS_SCHED":
            # msrun runs the script once more as the cluster's scheduler: init() serves the
            # workers until they are done, and that process has nothing else to do.
            sys.exit(0)
    world = get_group_size()
    if world != tensor_parallel:
        raise ConfigError(f"tensor_parallel is {tensor_parallel} but the process group has {world} ranks: "
                          f"{launch_hint(tensor_parallel)}")
    context = ParallelContext(get_rank(), world, shared_entropy())
    # The sockets rank 0 drives front ends over, and watches every rank by (parallel/lockstep.py).
    from mindglm.parallel.lockstep import open_channel
    open_channel(context, start_timeout)
    return context


def init_data_parallel(start_timeout: int = DEFAULT_START_TIMEOUT):
    """Join an msrun launch of 2+ workers that each hold a whole model (data-parallel training):
    this rank's context, or None outside msrun or with one worker."""
    world = launched_world()
    return init_tensor_parallel(world, start_timeout) if world > 1 else None


def shared_entropy() -> int:
    """A random 31-bit number drawn on rank 0 and broadcast to every rank."""
    from mindspore import Tensor, ops
    mine = np.array([np.random.SeedSequence().entropy % (2 ** 31)], np.int32)
    return int(ops.Broadcast(0)((Tensor(mine),))[0].asnumpy()[0])
