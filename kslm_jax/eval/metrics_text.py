"""Task metrics, computed here so nothing is downloaded: accuracy, macro-F1, Pearson, Spearman, BLEU, ROUGE-L.

BLEU and ROUGE-L compare Korean text character by character with whitespace removed: Korean spacing varies
between writers (붙여쓰기), and characters need no morphological analyzer. Both are reported on a 0-100 scale.
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


def pearson(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((dx * dx).sum() * (dy * dy).sum()))
    return float((dx * dy).sum() / denom) if denom else float("nan")


def ranks(x) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    out = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        out[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x, y) -> float:
    return pearson(ranks(x), ranks(y))


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
