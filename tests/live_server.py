"""A real `tools/serve.py` process on 127.0.0.1 for the serving tests (one per family per module)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIGS = {family: os.path.join(REPO, "configs", "tiny", f"{family}_e2e.yaml")
                for family in ("chatglm", "chatglm2", "chatglm3")}
STARTUP_SECONDS = 600  # model build + engine warm-up on a loaded 2-core machine
GUARDED_KEY = "test-key-13"
# the shared servers of the session (tests/conftest.py: `live_servers`)
# One small prefill bucket: fewer graphs to warm up per server (the replies do not depend on it).
FEW_BUCKETS = ["--set", "model.model_config.prefill_buckets=[64]"]
# Cache rows per family server: only ChatGLM3's serves concurrent streams (eight); the others'
# requests come one at a time, and each row bucket is a set of decode graphs to warm up.
ROWS = {"chatglm": "2", "chatglm2": "2", "chatglm3": "8"}
SERVER_ARGS = {
    **{family: ["--config", config, *FEW_BUCKETS, "--max-num-seqs", ROWS[family]]
       for family, config in TINY_CONFIGS.items()},
    # an API key, one cache row and one waiting place: for 401, 429 and disconnects
    "guarded": ["--config", TINY_CONFIGS["chatglm2"], *FEW_BUCKETS, "--api-key", GUARDED_KEY, "--max-num-seqs", "1",
                "--max-waiting", "1", "--served-model-name", "guarded"],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """`python tools/serve.py ARGS --port P`; `.url`, `.stop()`, `.log()`. Start several, then
    `wait_healthy()` each: they warm up in parallel."""

    def __init__(self, args: list, log_path: str, command: list = None, env: dict = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.statuses: list = []  # /health answers seen while starting (503 while warming up)
        command = command or [sys.executable, os.path.join(REPO, "tools", "serve.py")]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command + list(args) + ["--port", str(self.port)], cwd=REPO,
                                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def wait_healthy(self) -> "LiveServer":
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve.py exited with {self.process.returncode}:\n{self.log()}")
            try:
                status = httpx.get(self.url + "/health", timeout=5).status_code
                self.statuses.append(status)
                if status == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"serve.py not healthy after {STARTUP_SECONDS}s:\n{self.log()}")

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()[-6000:]

    def metrics(self) -> dict:
        """{'name{labels}': value} of /metrics (comments dropped)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def metric(self, prefix: str) -> float:
        """Sum of the samples whose name (with labels) starts with `prefix`."""
        return sum(v for k, v in self.metrics().items() if k.startswith(prefix))

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


class ServerPool:
    """The session's servers, started on first use (several at once warm up in parallel)."""

    def __init__(self, log_dir: str):
        self.log_dir, self.servers = log_dir, {}

    def get(self, *names) -> dict:
        fresh = [name for name in names if name not in self.servers]
        for name in fresh:
            self.servers[name] = LiveServer(SERVER_ARGS[name], os.path.join(self.log_dir, f"{name}.log"))
        for name in fresh:
            self.servers[name].wait_healthy()
        return {name: self.servers[name] for name in names}

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()
