"""MindSpore runtime settings mindglm chooses per device target, before MindSpore's runtime starts."""
from __future__ import annotations

import os

# Undocumented in MindSpore 2.10 (read in libmindspore_runtime_pipeline.so when the runtime starts):
# "1" launches every kernel from the calling thread instead of through the asynchronous pipeline.
HOST_BLOCKING_RUN = "MS_DEV_HOST_BLOCKING_RUN"


def launch_from_host_thread_on_cpu() -> None:
    """On a CPU target, launch kernels from the calling thread (HOST_BLOCKING_RUN=1).

    MindSpore's asynchronous launch pipeline keeps its queue threads waiting in AsyncRQueue::Wait,
    and on a few cores those threads take the cores from the kernels: under perf, 30% of a LoRA
    training step's samples on the `small` model (2 cores) were in that wait, and the step took
    0.96 s instead of 0.55 s with the kernels launched from the host thread; decode steps took the
    same time either way. A CPU has no device queue for the pipeline to run ahead of. Other targets
    keep the pipeline (an NPU or GPU needs its launches ahead of the device), and a value the user
    set is kept. MindSpore reads the variable once, when its runtime starts (the first graph or
    op), so this must run before that; later calls change nothing."""
    if HOST_BLOCKING_RUN in os.environ:
        return
    import mindspore as ms
    if ms.get_context("device_target") == "CPU":
        os.environ[HOST_BLOCKING_RUN] = "1"
