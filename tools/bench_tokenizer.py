"""Encode speed of mindglm's tokenizers next to sentencepiece's raw `EncodeAsIds`, same run, same text.

The document is generated deterministically (Chinese sentences, English, numbers, indented code
with tabs and blank runs), so runs are comparable without downloading anything. Prints one JSON
object.

    python tools/bench_tokenizer.py [--chars 1000000] [--repeats 5] [--tokenizers tests/fixtures/tokenizers]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mindglm.requirements import require_packages  # noqa: E402

if __name__ == "__main__":
    require_packages(__file__)

from mindglm.tokenization import TOKENIZER_FILES as VOCAB_FILES, load_tokenizer  # noqa: E402

SUBJECTS = ["今天的天气", "这座城市", "人工智能", "我的朋友", "这本书", "那家餐厅", "新的研究", "学生们", "公司的产品",
            "北京的秋天", "机器学习模型", "这个问题", "历史博物馆", "年轻的工程师", "长江流域", "传统文化"]
PREDICATES = ["非常有意思", "正在快速发展", "让人印象深刻", "需要更多时间来完成", "吸引了很多游客", "改变了我们的生活",
              "值得认真思考", "已经取得了重要进展", "在网上引起了广泛讨论", "比去年更加受欢迎", "还有很多不足之处"]
CONNECTIVES = ["因此", "但是", "而且", "同时", "所以说", "不过", "另外", "总的来说"]
ENGLISH = ["the model", "tokenizer speed", "large language models", "open source", "benchmark results",
           "MindSpore on Ascend", "a quick brown fox", "inference latency"]
CODE = ["def main():\n    print('hello world')", "for i in range(10):\n\tif i % 2:\n\t\tcontinue",
        "x  =  compute(a,   b)  # aligned", "    return {\"ok\": True,    \"n\": 42}"]
PUNCTUATION = ["。", "！", "？", "，", "；", ".", "!", "?"]


def make_sentences(rng: random.Random, count: int) -> list:
    """`count` distinct sentences mixing Chinese, English, numbers and code."""
    sentences = set()
    while len(sentences) < count:
        kind = rng.random()
        if kind < 0.7:
            first = f"{rng.choice(SUBJECTS)}{rng.choice(PREDICATES)}{rng.choice(PUNCTUATION[:5])}"
            second = f"{rng.choice(SUBJECTS)}{rng.choice(PREDICATES)}{rng.choice(PUNCTUATION[:3])}"
            sentence = first + rng.choice(CONNECTIVES) + second
        elif kind < 0.9:
            sentence = (f"{rng.choice(SUBJECTS)}在{rng.randint(1990, 2030)}年提到了 {rng.choice(ENGLISH)}，"
                        f"数值约为{rng.randint(1, 10000)}.{rng.randint(0, 99):02d}%{rng.choice(PUNCTUATION)}")
        else:
            sentence = rng.choice(CODE) + " " * rng.randint(0, 6) + f"# {rng.choice(SUBJECTS)} {rng.randint(0, 999)}"
        sentences.add(sentence)
    return sorted(sentences)


def make_document(chars: int, seed: int = 0, distinct: int = 400) -> str:
    """A deterministic mixed Chinese document of about `chars` characters."""
    rng = random.Random(seed)
    sentences = make_sentences(rng, distinct)
    parts, size = [], 0
    while size < chars:
        sentence = rng.choice(sentences)
        separator = rng.choice(["", "", "", "\n", "\n\n"])
        parts.append(sentence + separator)
        size += len(sentence) + len(separator)
    return "".join(parts)


def best_time(function, repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        timings.append(time.perf_counter() - start)
    return min(timings)


def measure(family: str, vocab_file: str, document: str, lines: list, repeats: int) -> dict:
    tok = load_tokenizer(vocab_file, family=family)
    sp = tok.sp
    result = {}
    for mode, run_mindglm, run_raw in [
        ("whole_document", lambda: tok.encode(document, add_special_tokens=False), lambda: sp.EncodeAsIds(document)),
        ("per_line", lambda: [tok.encode(line, add_special_tokens=False) for line in lines],
         lambda: [sp.EncodeAsIds(line) for line in lines]),
    ]:
        mindglm_ids, raw_ids = run_mindglm(), run_raw()
        count = lambda ids: len(ids) if mode == "whole_document" else sum(map(len, ids))  # noqa: E731
        mindglm_s, raw_s = best_time(run_mindglm, repeats), best_time(run_raw, repeats)
        result[mode] = {
            "mindglm_tokens": count(mindglm_ids), "mindglm_s": round(mindglm_s, 5),
            "mindglm_tokens_per_s": round(count(mindglm_ids) / mindglm_s),
            "sentencepiece_tokens": count(raw_ids), "sentencepiece_s": round(raw_s, 5),
            "sentencepiece_tokens_per_s": round(count(raw_ids) / raw_s),
            "time_ratio_mindglm_over_sentencepiece": round(mindglm_s / raw_s, 3),
        }
    if hasattr(tok, "preprocess"):
        # ChatGLM-6B rewrites whitespace first; sentencepiece alone on that rewritten text shows
        # how much of the gap is the rewrite and how much is sentencepiece matching the extra pieces.
        rewritten = tok.preprocess(document)
        rewritten_s = best_time(lambda: sp.EncodeAsIds(rewritten), repeats)
        result["whole_document"]["sentencepiece_on_rewritten_text_s"] = round(rewritten_s, 5)
        result["whole_document"]["rewrite_s"] = round(best_time(lambda: tok.preprocess(document), repeats), 5)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chars", type=int, default=1_000_000, help="document size in characters")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement; the best is kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizers", default=os.path.join(REPO, "tests", "fixtures", "tokenizers"),
                        help="directory holding ice_text.model and tokenizer.model")
    parser.add_argument("--families", nargs="+", default=list(VOCAB_FILES), choices=list(VOCAB_FILES))
    args = parser.parse_args(argv)

    document = make_document(args.chars, args.seed)
    lines = [line for line in document.split("\n") if line]
    report = {
        "document": {"chars": len(document), "lines": len(lines), "seed": args.seed,
                     "sha256": hashlib.sha256(document.encode()).hexdigest()[:16]},
        "repeats": args.repeats,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "results": {family: measure(family, os.path.join(args.tokenizers, VOCAB_FILES[family]),
                                    document, lines, args.repeats) for family in args.families},
    }
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return report


if __name__ == "__main__":
    main()
