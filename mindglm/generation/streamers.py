"""Streamers receive tokens as they are chosen (`GLMModel.generate(..., streamer=...)`)."""
from __future__ import annotations

import numpy as np


class Streamer:
    """Base class: `put(tokens)` once per step with one id per row, `end()` once at the end."""

    def put(self, tokens: np.ndarray) -> None:
        pass

    def end(self) -> None:
        pass
