"""Front ends under msrun: rank 0 does the console / file / HTTP work and owns the engine; every
other rank follows it, step by step.

    model = load_run_model(run)                   # every rank: its share of the network
    result = run_front_end(model, lambda: repl(model))   # rank 0 runs repl; the others follow

Why rank 0 plans and the others replay its plans, rather than every rank running its own
deterministic engine: a front end is not deterministic. HTTP requests arrive when they arrive,
clients disconnect (aborts), Ctrl-C interrupts a reply, threads interleave; only one process
sees those events. So rank 0's scheduler decides (its StepPlan is plain data, vLLM's
SchedulerOutput), and the followers run exactly the runner calls rank 0 runs — `execute(plan)`,
`release(request_id)`, `warmup()` — in the same order. The graph's collectives then pair up, and
the logits (gathered whole on every rank) are only sampled on rank 0.

The plans travel over a TCP socket from rank 0 to each follower, not a collective: a chat waits
on its user for as long as they like, and collectives time out when idle (MindSpore's CPU
Broadcast fails after a few minutes; HCCL's default limit is 30 minutes).

The sockets are opened once per process, when the ranks join (context.init_tensor_parallel), and
they also watch the ranks in any script, a plain SPMD one included: a follower that raises, or
disappears without saying goodbye at exit (killed, out of memory), makes rank 0 print one error
naming it and stop, instead of waiting inside a collective for a rank that is gone.
"""
from __future__ import annotations

import atexit
import os
import pickle
import socket
import struct
import sys
import threading
import traceback
from typing import Callable, Optional

import numpy as np

from mindglm.config import ConfigError

_HEADER = struct.Struct("!Q")


def _send(sock, message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv_exact(sock, size: int) -> Optional[bytes]:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _recv(sock):
    """The next message, or None when the peer is gone."""
    header = _recv_exact(sock, _HEADER.size)
    if header is None:
        return None
    data = _recv_exact(sock, _HEADER.unpack(header)[0])
    return None if data is None else pickle.loads(data)


def _broadcast_int(value: int) -> int:
    from mindspore import Tensor, ops
    return int(ops.Broadcast(0)((Tensor(np.array([value], np.int32)),))[0].asnumpy()[0])


_BYE = "bye"   # a follower's last message when it exits normally


class Channel:
    """Rank 0's sockets to the followers (on rank 0), or a follower's socket to rank 0."""

    def __init__(self, context, timeout: float):
        self.context = context
        self.peers = {}                # rank -> socket (rank 0 only)
        self.sock = None               # the socket to rank 0 (followers)
        host = os.environ.get("MS_SCHED_HOST", "127.0.0.1")
        if context.is_lead:
            server = socket.create_server(("", 0))
            server.settimeout(timeout)
            _broadcast_int(server.getsockname()[1])     # the one collective: where to connect
            try:
                for _ in range(context.world - 1):
                    peer, _ = server.accept()
                    rank = _recv(peer)
                    self.peers[rank] = peer
            except socket.timeout:
                raise ConfigError(f"the other ranks did not connect to rank 0 within {timeout:.0f} s") from None
            finally:
                server.close()
            threading.Thread(target=self._watch, daemon=True).start()
        else:
            port = _broadcast_int(0)
            self.sock = socket.create_connection((host, port), timeout=timeout)
            self.sock.settimeout(None)
            _send(self.sock, context.rank)
            atexit.register(self.report, _BYE)
            _report_uncaught_exceptions(self)

    # ------------------------------------------------------------------ rank 0
    def send(self, message) -> None:
        for peer in self.peers.values():
            _send(peer, message)

    def _watch(self) -> None:
        """Rank 0: a follower that reports an error or disappears stops the launch with one message."""
        import selectors
        selector = selectors.DefaultSelector()
        for rank, peer in self.peers.items():
            selector.register(peer, selectors.EVENT_READ, rank)
        while selector.get_map():
            for key, _ in selector.select():
                message = _recv(key.fileobj)
                if message == _BYE:
                    selector.unregister(key.fileobj)
                    continue
                rank = key.data
                reason = message if isinstance(message, str) else "it stopped without a word (killed?)"
                sys.stderr.write(f"error: rank {rank} of {self.context.world} failed: {reason}\n"
                                 f"Stopping every rank; rank {rank}'s own log (worker_{rank}.log in msrun's "
                                 "--log_dir) says why: fix that and launch again.\n")
                sys.stderr.flush()
                os._exit(1)

    # ------------------------------------------------------------------ followers
    def recv(self):
        return _recv(self.sock)

    def report(self, text: str) -> None:
        try:
            _send(self.sock, text)
        except OSError:
            pass


class LeadRunner:
    """Rank 0's runner: every call is sent to the followers, then run here."""

    def __init__(self, runner, channel: Channel, use_past: bool):
        self.runner, self.channel, self.use_past = runner, channel, use_past

    def _both(self, op: str, *args):
        self.channel.send((op, self.use_past, args))
        return getattr(self.runner, op)(*args)

    def execute(self, plan):
        return self._both("execute", plan)

    def release(self, request_id: str) -> None:
        return self._both("release", request_id)

    def warmup(self) -> int:
        return self._both("warmup")

    @property
    def compiles(self) -> int:
        return self.runner.compiles


def _report_uncaught_exceptions(channel: Channel) -> None:
    """A follower's uncaught exception goes to rank 0 as one line (then the usual traceback here)."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        channel.report(f"{kind.__name__}: {value}")
        previous(kind, value, tb)
    sys.excepthook = hook


_channel: Optional[Channel] = None


def open_channel(context, timeout: float) -> Channel:
    """The process's one Channel to the other ranks, opened the first time (every rank calls this
    when it joins the group, so the one collective it takes pairs up)."""
    global _channel
    if _channel is None:
        _channel = Channel(context, timeout)
    return _channel


def follow(model, channel: Channel) -> None:
    """A follower: run rank 0's runner calls on this rank's share until rank 0 stops."""
    while True:
        message = channel.recv()
        if message is None:
            raise SystemExit(f"rank {model.parallel.rank}: rank 0 stopped; stopping too")
        if message[0] == "stop":
            return
        op, use_past, args = message
        try:
            getattr(model.engine_for(use_past).runner, op)(*args)
        except Exception as exc:  # tell rank 0 (which would wait in the collective), then stop
            channel.report(f"{type(exc).__name__}: {exc}")
            traceback.print_exc()
            raise SystemExit(1) from None


def reports_errors() -> bool:
    """Should this process print a user error? Not an msrun follower: every rank reads the same
    config and finds the same mistake, and rank 0 says it once."""
    from mindglm.parallel.context import launched_rank, launched_world
    return launched_world() <= 1 or launched_rank() == 0


def run_front_end(model, main: Callable):
    """Run `main()` on rank 0 with every rank's runner in lockstep; other ranks follow until
    rank 0's `main` returns (or raises). Returns main's result on rank 0, None elsewhere. Without
    tensor parallelism this is just `main()`. Only engine work is replayed (generate, chat,
    stream_chat, batch inference, a server's requests): `model.logits()` inside `main` would wait
    for ranks that are not calling it."""
    context = model.parallel
    if context is None:
        return main()
    if _channel is None:
        raise RuntimeError("run_front_end: this process has not joined its ranks (load the model with "
                           "tensor_parallel under msrun)")
    if not context.is_lead:
        follow(model, _channel)
        return None
    model.wrap_runners(lambda runner, use_past: LeadRunner(runner, _channel, use_past))
    try:
        return main()
    finally:
        _channel.send(("stop",))
