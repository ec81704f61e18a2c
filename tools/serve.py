#!/usr/bin/env python
"""An OpenAI-compatible server with continuous batching and a web chat page: see mindglm/serving/cli.py.

    python tools/serve.py --checkpoint /path/to/chatglm3-6b [--host 127.0.0.1] [--port 8000]
        [--max-num-seqs N] [--api-key KEY] [--served-model-name NAME]
    python tools/serve.py --config configs/glm3/chatglm3_6b.yaml [--set k=v ...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mindglm.serving.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
