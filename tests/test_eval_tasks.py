"""Task formats and text metrics without a model: every format against hand-written records, every metric
against values computed by hand, and malformed files named by file and record."""
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from kslm_jax.core.errors import KslmError
from kslm_jax.data import records
from kslm_jax.eval import metrics_text as mt
from kslm_jax.eval import runner, tasks

KO_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ko"

# ------------------------------------------------------------------------------------------------- metrics

def test_accuracy_and_macro_f1_by_hand():
    gold = [0, 0, 1, 1, 2, 2]
    pred = [0, 1, 1, 1, 2, 0]
    assert mt.accuracy(gold, pred) == pytest.approx(4 / 6)
    # class 0: tp 1, fp 1, fn 1 -> 2/4; class 1: tp 2, fp 1, fn 0 -> 4/5; class 2: tp 1, fp 0, fn 1 -> 2/3
    assert mt.macro_f1(gold, pred) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert mt.macro_f1([1, 1], [0, 0]) == 0.0  # no true positive anywhere


def test_pearson_and_spearman_with_ties_by_hand():
    x, y = [1, 2, 3, 4], [2, 4, 5, 9]
    # deviations (-1.5,-.5,.5,1.5) and (-3,-1,0,4): cov 4.5+.5+0+6 = 11, |x|² 5, |y|² 26
    assert mt.pearson(x, y) == pytest.approx(11 / math.sqrt(5 * 26))
    # ties share their mean rank: ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): cov 4.5, |x|^2 4.5, |y|^2 5
    assert mt.spearman([10, 20, 20, 30], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert mt.spearman([3, 1, 2], [30, 10, 20]) == pytest.approx(1.0)
    # undefined correlations are NaN, not an exception or a warning turned into a number
    assert math.isnan(mt.pearson([1, 1, 1], [1, 2, 3])) and math.isnan(mt.spearman([5], [6]))


def test_rouge_l_is_character_level_f1_of_the_lcs():
    # "오늘 날씨 좋다" vs "오늘은 날씨가 좋다": chars 오늘날씨좋다 (6) and 오늘은날씨가좋다 (8), LCS 6
    assert mt.rouge_l(["오늘 날씨 좋다"], ["오늘은 날씨가 좋다"]) == pytest.approx(100 * 2 * 6 / 14)
    assert mt.rouge_l(["가나다"], ["라마"]) == 0.0
    assert mt.rouge_l(["띄어 쓰기"], ["띄어쓰기"]) == pytest.approx(100.0)  # spacing does not count
    assert mt.lcs(list("ABCBDAB"), list("BDCABA")) == 4


def test_bleu_by_hand():
    ref, hyp = "가나다라마", "가나다라바"
    # 1-grams 4/5, 2-grams 3/4, 3-grams 2/3, 4-grams 1/2; equal lengths: no brevity penalty
    expected = 100 * math.exp((math.log(4 / 5) + math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2)) / 4)
    assert mt.bleu([ref], [hyp]) == pytest.approx(expected)
    # a shorter hypothesis pays exp(1 - r/c)
    assert mt.bleu(["가나다라마"], ["가나다라"]) == pytest.approx(100 * math.exp(1 - 5 / 4))
    assert mt.bleu(["가나다라"], ["마바사아"]) == 0.0
    # clipping: a repeated hypothesis character counts only as often as in the reference
    assert mt.bleu(["가나"], ["가가"], max_n=1) == pytest.approx(50.0)


def _chatbot_pairs(n=300):
    """Real answers as references; each hypothesis swaps in the next answer's last word and drops the spaces."""
    with open(KO_DATA / "chatbot_qa.csv", encoding="utf-8") as f:
        answers = [row["A"] for row in csv.DictReader(f)][:n + 1]
    hyps = [" ".join(a.split()[:-1] + b.split()[-1:]).replace(" ", "") for a, b in zip(answers, answers[1:])]
    return answers[:n], hyps


def test_bleu_equals_sacrebleu_char():
    refs, hyps = _chatbot_pairs()
    theirs = sacrebleu.corpus_bleu(hyps, [refs], tokenize="char", smooth_method="none").score
    assert 5 < theirs < 95  # partial overlap: every n-gram order and the brevity penalty take part
    assert mt.bleu(refs, hyps) == pytest.approx(theirs, rel=1e-9)
    for ref, hyp in zip(refs[:40], hyps):
        assert mt.bleu([ref], [hyp]) == pytest.approx(
            sacrebleu.sentence_bleu(hyp, [ref], tokenize="char", smooth_method="none").score, rel=1e-9, abs=1e-9)


def test_rouge_score_cannot_read_hangul():
    """Why ROUGE-L is ours: rouge-score's tokenizer keeps only [a-z0-9], so Korean text has no tokens and an
    exact Korean match scores 0 there."""
    refs, _ = _chatbot_pairs(20)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert all(scorer.score(r, r)["rougeL"].fmeasure == 0.0 for r in refs)
    assert scorer.score("abc def", "abc def")["rougeL"].fmeasure == 1.0
    assert mt.rouge_l(refs, refs) == pytest.approx(100.0)


# ------------------------------------------------------------------------------------------------- formats

def _write(tmp_path, name, rows):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return p


FORMATS = {
    "kobest_boolq": ({"paragraph": "서울은 수도다.", "question": "서울은 수도인가?", "label": 1},
                     "서울은 수도다. 질문: 서울은 수도인가? 답변:", ["아니오", "예"], 1),
    "kobest_copa": ({"premise": "비가 왔다.", "question": "결과", "alternative_1": "땅이 젖었다.",
                     "alternative_2": "해가 떴다.", "label": 0},
                    "비가 왔다. 그래서", ["땅이 젖었다.", "해가 떴다."], 0),
    "kobest_hellaswag": ({"context": "그는 밥을", "ending_1": "먹었다", "ending_2": "날았다", "ending_3": "잤다",
                          "ending_4": "웃었다", "label": 0}, "문장: 그는 밥을", ["먹었다", "날았다", "잤다", "웃었다"], 0),
    "kobest_sentineg": ({"sentence": "재미없지 않았다", "label": 1}, "문장: 재미없지 않았다 긍부정:", ["부정", "긍정"], 1),
    "kobest_wic": ({"word": "배", "context_1": "배가 아프다", "context_2": "배를 탔다", "label": 0},
                   "문장1: 배가 아프다 문장2: 배를 탔다 두 문장에서 배가 같은 뜻으로 쓰였나?", ["아니오", "예"], 0),
    "kmmlu": ({"question": "1+1은?", "A": "1", "B": "2", "C": "3", "D": "4", "answer": 2},
              "1+1은?\nA. 1\nB. 2\nC. 3\nD. 4\n정답:", ["A", "B", "C", "D"], 1),
    "haerae": ({"query": "다음 중 과일은? (A) 사과 (B) 돌", "answer": "(A)"}, "다음 중 과일은? (A) 사과 (B) 돌",
               ["(A)", "(B)", "(C)", "(D)", "(E)"], 0),
    "click": ({"paragraph": "", "question": "수도는?", "choices": ["서울", "부산"], "answer": "서울"},
              "다음을 읽고 정답으로 알맞은 것을 고르시요.\n### Question: 수도는?\n### Options:\n(1) 서울\n(2) 부산\n"
              "### Answer: 주어진 문제의 정답은", ["(1)", "(2)"], 0),
    "mc": ({"question": "하늘은?", "choices": ["파랗다", "빨갛다"], "answer": 0}, "하늘은?", ["파랗다", "빨갛다"], 0),
    "kornli": ({"sentence1": "그는 왔다.", "sentence2": "그는 오지 않았다.", "gold_label": "contradiction"},
               "그는 왔다.\n질문: 그는 오지 않았다. 참, 거짓, 알 수 없음 중 무엇인가?\n답:", ["참", "알 수 없음", "거짓"], 2),
}


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_each_multiple_choice_format(tmp_path, kind):
    rec, context, choices, gold = FORMATS[kind]
    (q,) = tasks.questions(kind, records.read(_write(tmp_path, f"{kind}.jsonl", [rec])))
    assert (q.context, q.choices, q.gold) == (context, choices, gold)


def test_kmmlu_csv_and_korsts_tsv(tmp_path):
    p = tmp_path / "kmmlu-test.csv"
    p.write_text('question,A,B,C,D,answer\n"쉼표, 있는 질문",가,나,다,라,4\n', encoding="utf-8")
    (q,) = tasks.questions("kmmlu", records.read(p))
    assert q.context.startswith("쉼표, 있는 질문\nA. 가") and q.gold == 3
    t = tmp_path / "sts.tsv"
    t.write_text('genre\tscore\tsentence1\tsentence2\nx\t4.5\t"따옴표로 시작\t끝"\n', encoding="utf-8")
    assert tasks.sts_pairs(records.read(t)) == [('"따옴표로 시작', '끝"', 4.5)]


BAD = [
    ("kobest_copa", {"premise": "비", "question": "결과", "alternative_1": "a", "label": 0}, "missing field 'alternative_2'"),
    ("kmmlu", {"question": "q", "A": "1", "B": "2", "C": "3", "D": "4", "answer": 5}, "answer answer=5 is out of range 1..4"),
    ("kobest_boolq", {"paragraph": "p", "question": "q", "label": 2}, "out of range 0..1"),
    ("mc", {"question": "q", "choices": [], "answer": 0}, "must be a non-empty list"),
    ("mc", {"question": "q", "choices": ["a", ""], "answer": 0}, "empty or non-text choice"),
    ("click", {"question": "q", "choices": ["a", "b"], "answer": "c"}, "not among the choices"),
    ("haerae", {"query": "q", "answer": "A"}, "is not one of (A)"),
    ("kornli", {"sentence1": "a", "sentence2": "b", "gold_label": "maybe"}, "gold_label 'maybe'"),
]


@pytest.mark.parametrize("kind,rec,message", BAD, ids=[f"{k}-{m[:20]}" for k, _, m in BAD])
def test_malformed_records_name_file_and_record(tmp_path, kind, rec, message):
    good = FORMATS[kind][0]
    p = _write(tmp_path, "task.jsonl", [good, rec])
    with pytest.raises(KslmError) as e:
        tasks.questions(kind, records.read(p))
    assert f"{p} line 2" in str(e.value) and message in str(e.value) and f"task {kind}" in str(e.value)


def test_unreadable_files_and_specs(tmp_path):
    p = tmp_path / "broken.jsonl"
    p.write_text('{"question": "q"}\n{"question": \n', encoding="utf-8")
    with pytest.raises(KslmError, match=f"{p} line 2: not valid JSON"):
        list(records.read(p))
    with pytest.raises(KslmError, match="unknown record format"):
        list(records.read(tmp_path / "x.docx"))
    with pytest.raises(KslmError, match="unknown task kind 'kobest_xyz'"):
        tasks.parse_specs("kobest_xyz=a.jsonl")
    with pytest.raises(KslmError, match="is not kind=path"):
        tasks.parse_specs("kornli")
    assert tasks.parse_specs("mc=a.jsonl,mc=b.jsonl") == [("mc", "mc", "a.jsonl"), ("mc_2", "mc", "b.jsonl")]


class _FixedScorer:
    """Returns preset log-likelihoods, so the multiple-choice arithmetic can be checked by hand."""

    def __init__(self, sums):
        self.sums = np.asarray(sums, float)
        self.requests = None

    def loglik(self, params, requests):
        self.requests = requests
        return self.sums, np.ones(len(self.sums), int)


class _Sp:
    def Encode(self, texts, out_type=int):
        return [[len(t)] for t in texts]


def test_multiple_choice_accuracy_norm_and_fewshot_by_hand():
    qs = [tasks.Question("q1", ["가", "나다라"], 1), tasks.Question("q2", ["가나", "다"], 0)]
    # q1: sums (-2, -3): sum picks 0 (wrong), per char (-2, -1) picks 1 (right)
    # q2: sums (-1, -4): sum picks 0 (right), per char (-0.5, -4) picks 0 (right)
    s = runner.Subject(cfg=None, model=None, params=None, sp=_Sp(), scorer=_FixedScorer([-2, -3, -1, -4]))
    r = runner._multiple_choice(s, qs, [], 0)
    assert r["accuracy"] == 0.5 and r["accuracy_norm"] == 1.0 and r["chance"] == 0.5
    assert r["macro_f1"] == pytest.approx(mt.macro_f1([1, 0], [0, 0]))
    shots = [tasks.Question("예시 질문", ["오답", "정답"], 1)]
    runner._multiple_choice(s, qs, shots, 1)
    # the context of every request now starts with the worked example: its length grew by it
    assert s.scorer.requests[0][0][1] == len("예시 질문 정답\n\nq1")
