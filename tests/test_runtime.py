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
