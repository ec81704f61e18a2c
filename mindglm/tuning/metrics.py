"""ADGEN scores as THUDM's ptuning/main.py computes them: ROUGE-1/2/L F1 on jieba words
(rouge_chinese), BLEU-4 on characters (nltk, SmoothingFunction().method3), each x100 and
rounded to 4 places per example, then averaged over examples.

jieba, rouge_chinese and nltk are optional dependencies (`pip install mindglm[tuning]`).
"""
from __future__ import annotations

import numpy as np

from mindglm.config import ConfigError

KEYS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


def _libraries():
    try:
        import jieba
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from rouge_chinese import Rouge
    except ImportError as exc:
        raise ConfigError(f"scoring needs {exc.name}: pip install jieba rouge-chinese nltk "
                          "(or pip install 'mindglm[tuning]')") from None
    jieba.setLogLevel(60)  # jieba prints its dictionary loading to stderr otherwise
    return jieba, Rouge(), sentence_bleu, SmoothingFunction().method3


def score_pair(prediction: str, reference: str, libraries=None) -> dict:
    """{rouge-1, rouge-2, rouge-l, bleu-4} x100 of one prediction against its reference."""
    jieba, rouge, sentence_bleu, smoothing = libraries or _libraries()
    hypothesis = " ".join(jieba.cut(prediction))
    label = " ".join(jieba.cut(reference))
    scores = {}
    if hypothesis.split() and label.split():
        for key, value in rouge.get_scores(hypothesis, label)[0].items():
            scores[key] = round(value["f"] * 100, 4)
    else:  # rouge_chinese raises on an empty side; THUDM's main.py would crash, an empty reply scores 0
        scores.update({"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0})
    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=smoothing) if prediction else 0.0
    scores["bleu-4"] = round(bleu * 100, 4)
    return scores


def score(predictions, references) -> dict:
    """Mean scores over pairs, as THUDM's compute_metrics."""
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references: need the same, non-zero, "
                         "number")
    libraries = _libraries()
    per_pair = [score_pair(p, r, libraries) for p, r in zip(predictions, references)]
    return {key: float(np.mean([s[key] for s in per_pair])) for key in KEYS}
