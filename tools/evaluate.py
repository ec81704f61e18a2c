"""Score a model (optionally with an adapter) on ADGEN-style data, as THUDM's ptuning/main.py does.

    python tools/evaluate.py --config configs/glm2/chatglm2_6b.yaml [--adapter DIR] --data dev.json \\
        [--output-dir eval/] [--max-new-tokens 128] [--set generation.do_sample=false]

Every line's prompt (prompt_column, optional history_column, or a ChatGLM3 conversation whose
last assistant turn is the reference) goes through the model's engine, all lines at once
(continuous batching); replies are scored with ROUGE-1/2/L on jieba words and BLEU-4 on
characters (mindglm/tuning/metrics.py). Writes `metrics.json` and `generated_predictions.txt`
(one {"labels", "predict"} JSON per line, THUDM's file), each to a temporary name then renamed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mindglm.config import ConfigError  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the model's YAML run config")
    parser.add_argument("--adapter", metavar="DIR", help="a peft LoRA dir or a THUDM P-Tuning v2 dir")
    parser.add_argument("--data", required=True, help="JSON lines (ADGEN columns or ChatGLM3 conversations)")
    parser.add_argument("--output-dir", default="eval_output", help="where metrics.json and predictions go")
    parser.add_argument("--prompt-column", default="content")
    parser.add_argument("--response-column", default="summary")
    parser.add_argument("--history-column", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser.parse_args(argv)


def read_pairs(path: str, args) -> list:
    """[(query, history, reference)] of every line; a bad line is a DataError naming it."""
    from mindglm.tuning.data import DataError, json_lines
    pairs = []
    for _, where, record in json_lines(path):
        if "conversations" in record:
            turns = record["conversations"]
            if not turns or turns[-1].get("role") != "assistant" or len(turns) < 2:
                raise DataError(f"{where}: a conversation to score must end with user then assistant turns")
            pairs.append((turns[-2]["content"], turns[:-2], turns[-1]["content"]))
            continue
        for column in (args.prompt_column, args.response_column):
            if not isinstance(record.get(column), str):
                raise DataError(f"{where}: no text column '{column}'; pass --prompt-column / --response-column")
        history = record.get(args.history_column) or [] if args.history_column else []
        pairs.append((record[args.prompt_column], history, record[args.response_column]))
    return pairs


def generate_all(model, tokenizer, family, pairs, generation) -> list:
    """Replies to every (query, history), submitted to the engine together."""
    from mindglm import chat
    engine = model.engine
    stop_ids = chat.stop_token_ids(tokenizer, family)
    sequences = [engine.add_request(chat.build_chat_ids(tokenizer, family, query, history), generation,
                                    stop_ids=stop_ids) for query, history, _ in pairs]
    engine.run_until_done(sequences)
    return [tokenizer.decode([t for t in seq.output_ids if t not in stop_ids], skip_special_tokens=True).strip()
            for seq in sequences]


def write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mindglm.checkpoint import CheckpointError
    from mindglm.generation.config import GenerationConfig
    from mindglm.tuning.metrics import score
    from mindglm.yaml_config import apply_context, load_run_config
    try:
        extra = [("adapter", os.path.abspath(args.adapter))] if args.adapter else []
        run = load_run_config(args.config, extra + list(args.overrides))
        pairs = read_pairs(args.data, args)
        tokenizer = run.load_tokenizer()
        apply_context(run.context)
        from mindglm.pipeline import load_run_model
        model = load_run_model(run)
        generation = GenerationConfig.from_kwargs(run.generation, max_new_tokens=args.max_new_tokens)
        predictions = generate_all(model, tokenizer, run.family, pairs, generation)
        metrics = score(predictions, [reference for _, _, reference in pairs])
    except (ConfigError, CheckpointError) as exc:
        print(f"evaluate.py: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    os.makedirs(args.output_dir, exist_ok=True)
    lines = "".join(json.dumps({"labels": ref, "predict": pred}, ensure_ascii=False) + "\n"
                    for (_, _, ref), pred in zip(pairs, predictions))
    write_atomic(os.path.join(args.output_dir, "generated_predictions.txt"), lines)
    write_atomic(os.path.join(args.output_dir, "metrics.json"), json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
