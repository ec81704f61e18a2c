"""mindglm.runtime: the MindSpore runtime settings chosen per device target."""
import os
import subprocess
import sys

import mindspore as ms

from mindglm.runtime import HOST_BLOCKING_RUN, launch_from_host_thread_on_cpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_launches_from_the_host_thread_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv(HOST_BLOCKING_RUN, raising=False)
    launch_from_host_thread_on_cpu()
    assert ms.get_context("device_target") == "CPU" and os.environ[HOST_BLOCKING_RUN] == "1"
    monkeypatch.setenv(HOST_BLOCKING_RUN, "0")      # the user's value wins
    launch_from_host_thread_on_cpu()
    assert os.environ[HOST_BLOCKING_RUN] == "0"


def test_other_targets_keep_the_async_pipeline(monkeypatch):
    monkeypatch.delenv(HOST_BLOCKING_RUN, raising=False)
    monkeypatch.setattr(ms, "get_context",
                        lambda key: "Ascend" if key == "device_target" else None)
    launch_from_host_thread_on_cpu()
    assert HOST_BLOCKING_RUN not in os.environ


def test_building_a_network_sets_it_before_mindspore_runs_anything():
    """A fresh process that only imports the model package has the variable set (MindSpore reads
    it when its runtime starts, so it must be in place before any graph or op)."""
    env = {k: v for k, v in os.environ.items() if k != HOST_BLOCKING_RUN}
    code = "import os, mindglm.models; print(os.environ.get('%s'))" % HOST_BLOCKING_RUN
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "1"


SEQUENCE = """
import sys
from mindspore._c_expression import RuntimeConf
import mindspore as ms
from mindglm.config import GLMConfig
from mindglm.models import family_module
from mindglm.quantize import quantize_network

def build(**changes):
    config = GLMConfig(family="chatglm2", vocab_size=64, hidden_size=32, num_layers=1, num_attention_heads=4,
                       kv_channels=8, multi_query_group_num=2, ffn_hidden_size=48, seq_length=64, **changes)
    return quantize_network(family_module(config).build_network(config), config)

configured = RuntimeConf.get_instance().is_op_threads_num_configured
if sys.argv[1] == "user":
    ms.device_context.cpu.op_tuning.threads_num(2)
print(bool(build()), configured())
print(bool(build(quantization_bit=8)), configured())
"""


def run_sequence(mode: str) -> list:
    out = subprocess.run([sys.executable, "-c", SEQUENCE, mode], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-2:]


def test_kernel_backed_linears_give_mindspore_ops_one_thread():
    """A plain fp32 model (MindSpore's MatMul) leaves MindSpore's thread count alone; the first
    model whose Linear layers run on mindglm's kernels sets it (to one thread)."""
    assert run_sequence("default") == ["False False", "True True"]


def test_a_thread_count_the_user_set_is_kept():
    """threads_num may be set once per process: the rewrite must not try again (it would raise)."""
    assert run_sequence("user") == ["False True", "True True"]
