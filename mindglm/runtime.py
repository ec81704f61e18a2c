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


def one_thread_for_mindspore_ops() -> None:
    """Give MindSpore's own CPU ops one thread, once Linear layers run on mindglm's CPU kernels.

    The kernels bring their own thread pool over all the cores (mindglm/kernels/pool.h);
    MindSpore's pool, whose workers wait for work after each of its small ops, then competes with
    it for the same cores. On the `small` model (2 cores, batch-1 decode, two runs minutes apart)
    one thread for MindSpore's ops made the steps int8 14.0 ms instead of 23.2, fp16 17.9 instead
    of 23.4, int4 16.7 instead of 17.5, and a 512-token int8 prefill 1.52 s instead of 1.58: the
    ops left to MindSpore beside the kernels (norms, rotary, attention over the cache) are small.
    MindSpore takes the setting once per process: a value already set (by the user, or by an
    earlier model) is kept."""
    from mindspore._c_expression import RuntimeConf
    import mindspore as ms

    if not RuntimeConf.get_instance().is_op_threads_num_configured():
        ms.device_context.cpu.op_tuning.threads_num(1)
