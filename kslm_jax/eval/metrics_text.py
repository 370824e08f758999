"""Task metrics: accuracy, macro-F1, Pearson and Spearman (scipy.stats), character BLEU and ROUGE-L.

BLEU and ROUGE-L compare Korean text character by character with whitespace removed: Korean spacing varies
between writers (붙여쓰기), and characters need no morphological analyzer. Both are reported on a 0-100 scale.
BLEU equals sacrebleu's `tokenize="char"` with smoothing off (tests/test_eval_tasks.py checks it); it stays here
so evaluation needs no extra package. ROUGE-L stays here because rouge-score's tokenizer keeps only [a-z0-9]
and so turns every Hangul sentence into no tokens at all (a score of 0 for any Korean pair).
"""
from __future__ import annotations

import collections
import math

import numpy as np

TOKENIZATION = "characters (whitespace removed)"


def accuracy(gold, pred) -> float:
    gold, pred = np.asarray(gold), np.asarray(pred)
    return float((gold == pred).mean()) if len(gold) else float("nan")


def macro_f1(gold, pred) -> float:
    """Unweighted mean over the classes seen in gold or pred of 2TP / (2TP + FP + FN) (0 where undefined)."""
    gold, pred = np.asarray(gold), np.asarray(pred)
    scores = []
    for c in np.union1d(gold, pred):
        tp = np.sum((gold == c) & (pred == c))
        denom = 2 * tp + np.sum((gold != c) & (pred == c)) + np.sum((gold == c) & (pred != c))
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores)) if scores else float("nan")


def _correlation(name: str, x, y) -> float:
    """scipy.stats' correlation `name` of x and y; NaN where it is undefined (under two pairs, a constant side)."""
    from scipy import stats  # imported here: 0.5 s at import, which every `kslm` command would pay for KorSTS

    stat = getattr(stats, name)
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(stat(x, y).statistic)


def pearson(x, y) -> float:
    return _correlation("pearsonr", x, y)


def spearman(x, y) -> float:
    """Pearson of the ranks, ties sharing the mean of the ranks they span (scipy's default)."""
    return _correlation("spearmanr", x, y)


def char_tokens(text: str) -> list[str]:
    return [ch for ch in text if not ch.isspace()]


def lcs(a, b) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(references, hypotheses) -> float:
    """Mean over pairs of the LCS F1 (precision over the hypothesis, recall over the reference), x100."""
    scores = []
    for ref, hyp in zip(references, hypotheses):
        r, h = char_tokens(ref), char_tokens(hyp)
        n = lcs(r, h)
        scores.append(0.0 if n == 0 else 2 * n / (len(r) + len(h)))
    return 100.0 * float(np.mean(scores)) if scores else float("nan")


def bleu(references, hypotheses, max_n: int = 4) -> float:
    """Corpus BLEU x100 (Papineni et al.): clipped n-gram precisions pooled over the corpus, their geometric
    mean over n = 1..max_n, times the brevity penalty; no smoothing, so a missing order gives 0."""
    matches, totals = [0] * max_n, [0] * max_n
    ref_len = hyp_len = 0
    for ref, hyp in zip(references, hypotheses):
        r, h = char_tokens(ref), char_tokens(hyp)
        ref_len, hyp_len = ref_len + len(r), hyp_len + len(h)
        for n in range(1, max_n + 1):
            rc = collections.Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            hc = collections.Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            matches[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    if hyp_len == 0 or min(matches) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100.0 * bp * math.exp(log_p)
