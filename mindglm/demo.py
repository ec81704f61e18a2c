"""The bundled demo model: what `python run_chat.py` runs when it is given no model.

It is the tiny ChatGLM3-shaped test model in `tests/fixtures/chat/chatglm3-e2e` (1 layer, width
16, random weights, the real tokenizer), described by `configs/tiny/chatglm3_e2e.yaml`. It shows
that the chat front end works on a fresh clone; its replies are meaningless.
"""
from __future__ import annotations

import os
from typing import Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO_ROOT, "configs", "tiny", "chatglm3_e2e.yaml")
DEMO_MODEL_DIR = os.path.join(REPO_ROOT, "tests", "fixtures", "chat", "chatglm3-e2e")

REAL_WEIGHTS_HINT = (
    "For real replies point it at real weights: `python run_chat.py --checkpoint /path/to/chatglm3-6b` "
    "(a THUDM model dir: config.json, weights, tokenizer.model), or a converted checkpoint: "
    "`python run_chat.py --config configs/glm3/chatglm3_6b.yaml --checkpoint chatglm3_6b.ckpt "
    "--device CPU --set model.model_config.compute_dtype=float32` "
    "(convert with `python -m ckpt_convert --src <THUDM dir> --dst chatglm3_6b.ckpt`).")

DEMO_NOTICE = (
    "No --config or --checkpoint given: running the bundled demo model "
    "(tests/fixtures/chat/chatglm3-e2e: 1 layer, width 16, RANDOM weights, real tokenizer). "
    "Its replies are meaningless. " + REAL_WEIGHTS_HINT)


def demo_config() -> Optional[str]:
    """Path of the demo's YAML config, or None when this checkout does not ship the demo model."""
    if os.path.isfile(DEMO_CONFIG) and os.path.isfile(os.path.join(DEMO_MODEL_DIR, "config.json")):
        return DEMO_CONFIG
    return None
