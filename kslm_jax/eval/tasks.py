"""Task files → questions: the record formats of KoBEST, KMMLU, HAE-RAE, CLIcK, KorNLI, KorSTS and our own.

A multiple-choice record becomes (context, choices, gold); the model scores each choice as a continuation of
the context (one space between them, which SentencePiece's word-boundary piece supplies). Prompts follow
lm-evaluation-harness where it has the task (KoBEST, KMMLU, HAE-RAE, CLIcK), so numbers are comparable in
kind; they are not guaranteed identical (tokenization differs). A record that does not fit its format stops
the task with one error naming the file, the record and what is wrong.
"""
from __future__ import annotations

import dataclasses

from kslm_jax.core.errors import KslmError


@dataclasses.dataclass
class Question:
    context: str
    choices: list[str]
    gold: int


class Rec:
    """Field access that names the task, file and record on failure."""

    def __init__(self, kind: str, where: str, rec: dict):
        self.kind, self.where, self.rec = kind, where, rec

    def fail(self, what: str):
        raise KslmError(f"task {self.kind}: {self.where}: {what}")

    def text(self, key: str, allow_empty: bool = False) -> str:
        v = self.rec.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str):
            self.fail(f"missing field {key!r}" if v is None else f"field {key!r} is not text")
        if not allow_empty and not v.strip():
            self.fail(f"field {key!r} is empty")
        return v.strip()

    def index(self, key: str, n: int, base: int = 0) -> int:
        v = self.rec.get(key)
        if v is None:
            self.fail(f"missing field {key!r}")
        try:
            i = int(str(v).strip())
        except ValueError:
            self.fail(f"field {key!r}={v!r} is not a number")
        if not base <= i < n + base:
            self.fail(f"answer {key}={i} is out of range {base}..{n + base - 1}")
        return i - base

    def number(self, key: str) -> float:
        try:
            return float(self.text(key))
        except ValueError:
            self.fail(f"field {key!r}={self.rec.get(key)!r} is not a number")


def _boolq(r: Rec) -> Question:
    return Question(f"{r.text('paragraph')} 질문: {r.text('question')} 답변:", ["아니오", "예"], r.index("label", 2))


def _copa(r: Rec) -> Question:
    connector = {"원인": "왜냐하면", "결과": "그래서"}.get(r.text("question"))
    if connector is None:
        r.fail(f"field 'question'={r.rec.get('question')!r} must be 원인 or 결과")
    return Question(f"{r.text('premise')} {connector}", [r.text("alternative_1"), r.text("alternative_2")],
                    r.index("label", 2))


def _hellaswag(r: Rec) -> Question:
    return Question(f"문장: {r.text('context')}", [r.text(f"ending_{i}") for i in range(1, 5)], r.index("label", 4))


def _sentineg(r: Rec) -> Question:
    return Question(f"문장: {r.text('sentence')} 긍부정:", ["부정", "긍정"], r.index("label", 2))


def _wic(r: Rec) -> Question:
    ctx = f"문장1: {r.text('context_1')} 문장2: {r.text('context_2')} 두 문장에서 {r.text('word')}가 같은 뜻으로 쓰였나?"
    return Question(ctx, ["아니오", "예"], r.index("label", 2))


def _kmmlu(r: Rec) -> Question:
    letters = "ABCD"
    opts = "\n".join(f"{x}. {r.text(x)}" for x in letters)
    return Question(f"{r.text('question')}\n{opts}\n정답:", list(letters), r.index("answer", 4, base=1))


def _haerae(r: Rec) -> Question:
    choices = [f"({x})" for x in "ABCDE"]
    answer = r.text("answer")
    if answer not in choices:
        r.fail(f"answer {answer!r} is not one of {', '.join(choices)}")
    return Question(r.text("query"), choices, choices.index(answer))


def _choice_list(r: Rec, key: str = "choices") -> list[str]:
    v = r.rec.get(key)
    if v is None:
        r.fail(f"missing field {key!r}")
    if not isinstance(v, list) or not v:
        r.fail(f"field {key!r} must be a non-empty list of choices")
    if any(not isinstance(c, (str, int, float)) or not str(c).strip() for c in v):
        r.fail(f"field {key!r} holds an empty or non-text choice")
    return [str(c).strip() for c in v]


def _click(r: Rec) -> Question:
    choices = _choice_list(r)
    answer = r.text("answer")
    if answer not in choices:
        r.fail(f"answer {answer!r} is not among the choices")
    paragraph = r.text("paragraph", allow_empty=True)
    opts = "\n".join(f"({i}) {c}" for i, c in enumerate(choices, 1))
    ctx = (f"{paragraph}\n" if paragraph else "") + (f"다음을 읽고 정답으로 알맞은 것을 고르시요.\n### Question: "
                                                     f"{r.text('question')}\n### Options:\n{opts}\n### Answer: 주어진 문제의 정답은")
    return Question(ctx, [f"({i})" for i in range(1, len(choices) + 1)], choices.index(answer))


def _generic(r: Rec) -> Question:
    choices = _choice_list(r)
    return Question(r.text("question"), choices, r.index("answer", len(choices)))


NLI_LABELS = ("entailment", "neutral", "contradiction")


def _kornli(r: Rec) -> Question:
    label = r.text("gold_label")
    if label not in NLI_LABELS:
        r.fail(f"gold_label {label!r} is not one of {', '.join(NLI_LABELS)}")
    ctx = f"{r.text('sentence1')}\n질문: {r.text('sentence2')} 참, 거짓, 알 수 없음 중 무엇인가?\n답:"
    return Question(ctx, ["참", "알 수 없음", "거짓"], NLI_LABELS.index(label))


MULTIPLE_CHOICE = {
    "kobest_boolq": _boolq, "kobest_copa": _copa, "kobest_hellaswag": _hellaswag, "kobest_sentineg": _sentineg,
    "kobest_wic": _wic, "kmmlu": _kmmlu, "haerae": _haerae, "click": _click, "kornli": _kornli, "mc": _generic,
}
# ppl: perplexity and bits per character of text; korsts: similarity correlation; cls: the workdir's
# classifier; gen: greedy answers scored by BLEU and ROUGE-L.
OTHER = ("ppl", "korsts", "cls", "gen")
KINDS = tuple(MULTIPLE_CHOICE) + OTHER


def questions(kind: str, recs) -> list[Question]:
    out = [MULTIPLE_CHOICE[kind](Rec(kind, where, rec)) for where, rec in recs]
    return out


def sts_pairs(recs) -> list[tuple[str, str, float]]:
    out = []
    for where, rec in recs:
        r = Rec("korsts", where, rec)
        score = r.number("score")
        if not 0.0 <= score <= 5.0:
            r.fail(f"score {score} is outside 0..5")
        out.append((r.text("sentence1"), r.text("sentence2"), score))
    return out


def pairs(kind: str, recs, prompt_field: str, response_field: str) -> list[tuple[str, str]]:
    return [(r.text(prompt_field), r.text(response_field)) for r in (Rec(kind, w, x) for w, x in recs)]


def parse_specs(spec: str, what: str = "--tasks") -> list[tuple[str, str, str]]:
    """"kind=path,kind=path" → [(name, kind, path)]; a kind given twice gets names kind, kind_2, ..."""
    out, seen = [], {}
    for item in filter(None, (x.strip() for x in (spec or "").split(","))):
        kind, sep, path = item.partition("=")
        kind = kind.strip()
        if not sep or not path.strip():
            raise KslmError(f"{what}: {item!r} is not kind=path (e.g. kornli=../shared/data/ko/kornli_xnli_dev.tsv)")
        if kind not in KINDS:
            raise KslmError(f"{what}: unknown task kind {kind!r}; kinds: {', '.join(KINDS)}")
        seen[kind] = seen.get(kind, 0) + 1
        out.append((kind if seen[kind] == 1 else f"{kind}_{seen[kind]}", kind, path.strip()))
    return out
