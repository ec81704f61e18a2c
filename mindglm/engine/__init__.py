"""The inference engine: per-request sequences over a pool of KV cache rows.

- `Sequence` (sequence.py): one request's prompt, position rule, sampling settings, RNG, stop ids,
  budget, generated ids and finish reason.
- `Scheduler` (scheduler.py): waiting/running queues, free rows, chunked prefill; emits a
  plain-data `StepPlan`.
- `ModelRunner` (model_runner.py): the cache pool and the compiled graphs; executes a plan.
- `sample` (sampler.py): each sequence's next token.
- `Engine` (engine.py): add_request / step / abort, the one entry point front ends use.
"""
from mindglm.engine.config import EngineConfig

# The rest needs MindSpore: loaded on first use, so reading configs stays cheap.
_LAZY = {
    "Engine": "mindglm.engine.engine", "PromptTooLong": "mindglm.engine.engine",
    "check_token_ids": "mindglm.engine.engine", "token_budget": "mindglm.engine.engine",
    "QueueFull": "mindglm.engine.scheduler", "StepPlan": "mindglm.engine.scheduler",
    "Sequence": "mindglm.engine.sequence",
}
__all__ = ["EngineConfig", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mindglm.engine' has no attribute {name!r}")
