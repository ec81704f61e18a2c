"""ADGEN metrics against the formulas THUDM's main.py relies on, computed by hand here."""
import math

import pytest

pytest.importorskip("jieba")
pytest.importorskip("rouge_chinese")
pytest.importorskip("nltk")

import jieba  # noqa: E402

from mindglm.tuning.metrics import score, score_pair  # noqa: E402


def _f1(overlap, hyp, ref):
    p, r = overlap / hyp, overlap / ref
    return 2 * p * r / (p + r) if overlap else 0.0


def _ngrams(tokens, n):
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def _overlap(a, b):
    counts = {}
    for g in b:
        counts[g] = counts.get(g, 0) + 1
    hit = 0
    for g in a:
        if counts.get(g, 0):
            counts[g] -= 1
            hit += 1
    return hit


def _lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def _bleu4_method3(hyp, ref):
    """Sentence BLEU-4 (uniform weights, brevity penalty) with NIST geometric smoothing (method3)."""
    logs, zeros = [], 1
    for n in range(1, 5):
        grams = _ngrams(hyp, n)
        hit = _overlap(grams, _ngrams(ref, n))
        if hit == 0:
            zeros *= 2
            logs.append(math.log(1 / (zeros * len(grams))))
        else:
            logs.append(math.log(hit / len(grams)))
    brevity = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return brevity * math.exp(sum(logs) / 4)


@pytest.mark.parametrize("prediction,reference", [("我爱北京", "我爱北京天安门"), ("北京我爱天安门", "我爱北京天安门"),
                                                  ("这条裙子很好看", "这是一条好看的连衣裙")])
def test_scores_equal_the_reference_formulas(prediction, reference):
    ours = score_pair(prediction, reference)
    hyp = [w for w in jieba.cut(prediction) if w.strip()]
    ref = [w for w in jieba.cut(reference) if w.strip()]
    for n, key in ((1, "rouge-1"), (2, "rouge-2")):
        grams_h, grams_r = _ngrams(hyp, n), _ngrams(ref, n)
        assert ours[key] == pytest.approx(100 * _f1(_overlap(grams_h, grams_r), len(grams_h), len(grams_r)), abs=1e-4)
    assert ours["rouge-l"] == pytest.approx(100 * _f1(_lcs(hyp, ref), len(hyp), len(ref)), abs=1e-4)
    assert ours["bleu-4"] == pytest.approx(100 * _bleu4_method3(list(prediction), list(reference)), abs=1e-4)


def test_mean_over_examples_and_empty_predictions():
    first, second = score_pair("我爱北京", "我爱北京天安门"), score_pair("", "我爱北京")
    assert first["bleu-4"] == pytest.approx(100 * math.exp(1 - 7 / 4), abs=1e-4)   # all n-grams match; brevity
    assert second == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}
    mean = score(["我爱北京", ""], ["我爱北京天安门", "我爱北京"])
    assert mean == {k: pytest.approx((first[k] + second[k]) / 2) for k in first}
    with pytest.raises(ValueError, match="same, non-zero"):
        score(["a"], [])
