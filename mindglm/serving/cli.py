"""`python tools/serve.py`: an OpenAI-compatible server over one model, with a chat page at `/`.

    python tools/serve.py --checkpoint /path/to/chatglm3-6b            # a THUDM dir: all inferred
    python tools/serve.py --config configs/glm3/chatglm3_6b.yaml --set checkpoint=model.ckpt
    python tools/serve.py --config configs/tiny/chatglm3_e2e.yaml --port 8000 --max-num-seqs 8

Binds 127.0.0.1 unless --host says otherwise. The model is built as run_chat.py builds it
(mindglm.yaml_config), then the engine warms up while /health answers 503. SIGTERM drains: new
requests get 503, running ones finish (up to --drain-timeout seconds), then exit 0.
A configuration mistake is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only (it warns about every absent backend)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="serve.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML run config (configs/...)")
    parser.add_argument("--checkpoint", help="a THUDM model dir (alone: everything inferred from it) or, with "
                        "--config, a .ckpt / THUDM dir replacing the config's checkpoint")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. generation.top_p=0.5 (repeatable)")
    parser.add_argument("--device", choices=["CPU", "GPU", "Ascend"], help="override context.device_target")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--max-num-seqs", type=int, help="sequences decoded together (engine cache rows)")
    parser.add_argument("--max-waiting", type=int, help="requests allowed to wait for a row; more get 429")
    parser.add_argument("--api-key", default=os.environ.get("MINDGLM_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1/* (default: $MINDGLM_API_KEY)")
    parser.add_argument("--served-model-name", help="model id in the API (default: the checkpoint's base name)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds running requests may take to finish after SIGTERM (default 30)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def served_name(checkpoint: str) -> str:
    """The checkpoint dir's base name, or the file's without its extension."""
    path = os.path.normpath(checkpoint)
    name = os.path.basename(path)
    return name if os.path.isdir(path) else os.path.splitext(name)[0]


def build(args):
    """(model, tokenizer, RunConfig, checkpoint) from the command line; the engine is not built yet."""
    from mindglm.config import ConfigError
    from mindglm.yaml_config import apply_context, resolve_run

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    # the engine options are the YAML's `engine:` keys, checked where every engine setting is
    engine = [(f"engine.{key}", value) for key, value in (("max_num_seqs", args.max_num_seqs),
                                                          ("max_waiting", args.max_waiting)) if value is not None]
    run = resolve_run(args.config, args.checkpoint, args.device, list(args.overrides) + engine)
    checkpoint = run.require_checkpoint()
    tokenizer = run.load_tokenizer()
    apply_context(run.context)
    from mindglm.pipeline import load_run_model
    return load_run_model(run), tokenizer, run, checkpoint


def main(argv=None) -> int:
    args = parse_args(argv)
    from mindglm.chat import ChatError
    from mindglm.checkpoint import CheckpointError
    from mindglm.config import ConfigError
    from mindglm.parallel.lockstep import reports_errors, run_front_end

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s: %(message)s")
    try:
        model, tokenizer, run, checkpoint = build(args)
    except (ConfigError, CheckpointError, ChatError) as exc:
        if reports_errors():  # under msrun every rank finds the same mistake: rank 0 says it once
            print(f"serve.py: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    # Under msrun with tensor_parallel, rank 0 serves HTTP and the other ranks follow its engine.
    return run_front_end(model, lambda: serve_http(args, model, tokenizer, run, checkpoint)) or 0


def serve_http(args, model, tokenizer, run, checkpoint) -> int:
    """The HTTP server over `model` (rank 0's work under msrun)."""
    for note in run.notes:
        print(f"note: {note}", file=sys.stderr)
    from mindglm.serving.app import ServerState
    from mindglm.serving.server import serve

    state = ServerState(model, tokenizer, args.served_model_name or served_name(checkpoint), args.api_key)
    print(f"serving {state.model_name} ({state.family}) on http://{args.host}:{args.port} "
          f"(max_num_seqs {model.engine_config.max_num_seqs}); warming up", file=sys.stderr, flush=True)
    return serve(state, args.host, args.port, args.drain_timeout, args.log_level)
