"""Ctrl-C for front ends that run MindSpore graphs.

MindSpore's graph runtime installs its own SIGINT handler on every compiled-graph run, which
turns Ctrl-C into SIGTERM; and a KeyboardInterrupt raised in the middle of a graph compilation
makes MindSpore dump error reports. So front ends install an InterruptFlag for SIGINT and
SIGTERM while the model runs and check `requested` between two tokens or batches.
"""
from __future__ import annotations

import sys
from typing import Optional


class InterruptFlag:
    """Signal handler: the first signal sets `requested` (and prints `message`, if any); a second
    one raises KeyboardInterrupt at once."""

    def __init__(self, message: Optional[str] = None):
        self.requested = False
        self.message = message

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.message:
            sys.stderr.write(self.message)
            sys.stderr.flush()
