"""Cleaning rules and document filters, each on hand-checked Korean text, with false-positive guards."""
import collections
import gzip
import itertools
import json
import re
import unicodedata
from pathlib import Path

import pytest

from kslm_jax.core import config
from kslm_jax.core.errors import KslmError
from kslm_jax.data import clean, filters

KO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ko"


def _settings(**changes) -> clean.CleanSettings:
    d = config.base_config().data
    for k, v in changes.items():
        d[k] = v
    return clean.CleanSettings.from_config(d)


def _clean(text, **changes):
    return clean.Cleaner(_settings(**changes)).clean(text)


def _touch(touched, rule):
    return next((t for t in touched if t.rule == rule), None)


# ---------------------------------------------------------------------------------------------- HTML, URLs, e-mails


def test_rules_and_counts():
    stats = collections.Counter()
    text = ("<p>제1조 <b>목적</b></p> <개정 2010.1.1> <!-- 주석 -->"
            "\nA &amp; B 그리고 &lt;참고&gt;"
            "\n자세한 내용: https://example.com/a?b=1 또는 www.example.org 참조"
            "\n문의: hong.gildong@example.co.kr 로 연락"
            "\n널\x00문자\x07와\u200b제어\x1f 끝"
            "\n  여러\t\t개의   공백\u00a0과\u3000전각  "
            "\n\n\n\n\n마지막\r\n줄")
    out = clean.clean_text(text, config.base_config().data, stats)
    assert out == ("제1조 목적 <개정 2010.1.1>"
                   "\nA & B 그리고 <참고>"
                   "\n자세한 내용: <URL> 또는 <URL> 참조"
                   "\n문의: <이메일> 로 연락"
                   "\n널문자와제어 끝"
                   "\n여러 개의 공백 과 전각"
                   "\n\n마지막\n줄")
    assert stats["html_tags"] == 5  # <p> <b> </b> </p> <!-- -->
    assert stats["html_entities"] == 1  # counted per document that had any
    assert stats["urls"] == 2 and stats["emails"] == 1 and stats["control_chars"] == 4


def test_touches_count_characters_and_keep_examples():
    out, drop, touched = _clean("<p>안녕 &lt;b&gt; &amp;</p>  ㅋㅋㅋㅋㅋㅋ")
    assert out == "안녕 <b> & ㅋㅋㅋ" and drop is None
    assert _touch(touched, "html_tags") == clean.Touch("html_tags", 2, 7, ("<p>", "</p>"))
    assert _touch(touched, "html_entities") == clean.Touch("html_entities", 1, 10, ("&lt;", "&gt;", "&amp;"))
    assert _touch(touched, "repeated_chars") == clean.Touch("repeated_chars", 1, 3, ("ㅋㅋㅋㅋㅋㅋ",))
    assert _touch(touched, "whitespace").chars == 3  # two leading, one inner (where </p> was)


def test_keep_leaves_urls_and_emails():
    text = "<신설 2015.3.27> 자세한 것은 https://example.com 또는 a@b.com 참조"
    out, drop, touched = _clean(text, url_action="keep", email_action="keep")
    assert out == text and drop is None and touched == []


def test_email_at_www_host_and_korean_particles():
    assert _clean("문의는 kim.chulsoo@www.example.com 으로")[0] == "문의는 <이메일> 으로"
    out = _clean("kim@example.com으로 보내고 https://example.com/a?b=1에서 확인")[0]
    assert out == "<이메일>으로 보내고 <URL>에서 확인"


def test_placeholders_survive_a_second_pass():
    once = _clean("https://x.kr 010-1234-5678 a@b.kr 900101-1234567 4518-1234-5678-9012")[0]
    assert once == "<URL> <전화번호> <이메일> <주민번호> <카드번호>"
    assert _clean(once)[0] == once


def test_nfc_counted_and_never_nfkc():
    out, _, touched = _clean("\u1112\u1161\u11ab\u1100\u116e\u11a8\uc5b4 ㅋㅋ ① Ａ")
    assert out == "한국어 ㅋㅋ ① Ａ"
    assert _touch(touched, "nfc") == clean.Touch("nfc", 1, 4, ())  # six jamo became two syllables


# ---------------------------------------------------------------------------------------------- personal data

PHONES = ["010-1234-5678", "010 1234 5678", "010.1234.5678", "01012345678", "011-318-7092", "02-123-4567",
          "031-123-4567", "064-1234-5678", "070-1234-5678", "+82 10 1234 5678", "+82-10-1234-5678", "+821012345678",
          "+82-2-123-4567"]
NOT_PHONES = ["2024-01-15", "2024.01.15", "24.01.15", "1,000,000원", "10000000원", "1988년", "영화 10275182",
              "1588-1234", "02-12-2024", "0212345678", "2010-1234-5678", "010-1234-56789", "오전 10:30",
              "3.14159", "제12조 제3항", "ISBN 978-89-1234-567-8"]


@pytest.mark.parametrize("phone", PHONES)
def test_phone_numbers_replaced(phone):
    out, drop, touched = _clean(f"연락처는 {phone} 입니다")
    assert out == "연락처는 <전화번호> 입니다" and drop is None
    t = _touch(touched, "phones")
    assert t.count == 1 and t.chars == len(phone)
    assert not re.search(r"\d", t.examples[0][3:])  # the report shows the shape, not the number


@pytest.mark.parametrize("text", NOT_PHONES)
def test_dates_prices_and_ids_survive(text):
    out, drop, touched = _clean(f"기록: {text} 끝")
    assert out == f"기록: {text} 끝" and drop is None and touched == []


def test_resident_registration_numbers():
    out, _, touched = _clean("주민번호 900101-1234567, 외국인 020101-5123456")
    assert out == "주민번호 <주민번호>, 외국인 <주민번호>"
    assert _touch(touched, "rrns").examples == ("******-*******", "******-*******")  # no birth date either
    # month 13, day 32, no such 7th digit, no hyphen (a barcode looks the same), longer numbers
    for text in ("991301-1234567", "900132-1234567", "900101-9234567", "9001011234567", "8801234567890",
                 "1900101-1234567", "900101-12345678"):
        assert _clean(f"번호 {text} 끝")[0] == f"번호 {text} 끝", text


def test_card_numbers():
    out, _, touched = _clean("카드 1234-5678-9012-3456 와 4518 1234 5678 9012 결제")
    assert out == "카드 <카드번호> 와 <카드번호> 결제"
    assert _touch(touched, "cards").chars == 38
    # four years in a row, three groups, mixed separators, a fifth group, an 8-digit first group
    for text in ("2019 2020 2021 2022", "1234-5678-9012", "1234-5678 9012-3456", "1234-5678-9012-3456-7890",
                 "12345678-9012-3456"):
        assert _clean(f"번호 {text} 끝")[0] == f"번호 {text} 끝", text


def test_pii_actions_drop_and_keep():
    text = "문의 010-1234-5678 ㅋㅋㅋㅋ"
    out, drop, touched = _clean(text, phone_action="drop")
    assert drop == "phones" and "010-1234-5678" in out
    assert _touch(touched, "phones") == clean.Touch("phones", 1, len(text), ("010-****-****",))
    assert out == "문의 010-1234-5678 ㅋㅋㅋ"  # the rest of the rules still ran
    out, drop, touched = _clean(text, phone_action="keep")
    assert drop is None and _touch(touched, "phones") is None and "010-1234-5678" in out
    assert _clean("연도 2019 2020 2021 2022", card_action="drop")[1] is None
    assert _clean("카드 4518-1234-5678-9012", card_action="drop")[1] == "cards"
    assert _clean("메일 a@b.kr 주소 www.x.kr", email_action="drop", url_action="drop")[1] == "emails"  # first wins


# ---------------------------------------------------------------------------------------------- repeated characters


@pytest.mark.parametrize("text,expected", [
    ("ㅋㅋㅋㅋㅋㅋ 웃겨", "ㅋㅋㅋ 웃겨"), ("슬퍼요ㅠㅠㅠㅠ", "슬퍼요ㅠㅠㅠ"), ("대박!!!!!!", "대박!!!"),
    ("그래서......", "그래서..."), ("하하하하하하", "하하하"), ("아~~~~~", "아~~~"),
    ("ㅋㅋㅋ 그대로", "ㅋㅋㅋ 그대로"), ("ㅠㅠ", "ㅠㅠ"), ("1000000원", "1000000원"), ("2000년 3월", "2000년 3월"),
    ("가나다라", "가나다라"),
])
def test_runs_capped_at_three(text, expected):
    assert _clean(text)[0] == expected


def test_repeat_cap_is_configurable():
    assert _clean("ㅋㅋㅋㅋㅋ!!", max_repeat=1)[0] == "ㅋ!"
    assert _clean("ㅋㅋㅋㅋㅋ", max_repeat=0)[0] == "ㅋㅋㅋㅋㅋ"
    assert _clean("www.naver.com", url_action="keep")[0] == "www.naver.com"  # www stays whole at 3


# ---------------------------------------------------------------------------------------------- document filters


def test_ratios_by_hand():
    assert clean.hangul_ratio("한국어 漢字 ABC 123") == pytest.approx(3 / 11)
    assert clean.hangul_ratio("ㅋㅋㅋ ㅎㅎ") == 1.0 and clean.hangul_ratio("\u1112\u1161\u11ab") == 1.0
    assert clean.hangul_ratio(" \n ") == 0.0
    assert filters.symbol_ratio("와.. 정말!!") == pytest.approx(4 / 7)
    assert filters.symbol_ratio("①번 ㅋ_ㅋ") == pytest.approx(1 / 5)  # ① is a digit, _ a symbol
    assert filters.duplicate_line_ratio("가나다\n라마\n가나다\n\n가나다") == pytest.approx(6 / 11)
    assert filters.duplicate_line_ratio("한 줄짜리 문서") == 0.0
    words = "재미없음 재미없음 재미없음 최악".split()
    # 2-gram (재미없음, 재미없음) at 0 and 1: repeats cover word 2 only → 4 of 14 characters
    assert filters.top_ngram_ratio(words, 2) == pytest.approx(4 / 14)
    assert filters.top_ngram_ratio("너무 너무 좋아요".split(), 2) == 0.0  # no 2-gram repeats


def _reject(text, **changes):
    d = config.base_config().data
    for k, v in changes.items():
        d[k] = v
    return clean.rejection(text, d)


def test_each_filter_rejects():
    assert _reject("짧은 글") == "too_short"
    assert _reject("가" * 101, max_chars=100) == "too_long"
    assert _reject("가" * 101, max_chars=0) is None  # 0: no limit
    assert _reject("This sentence is English 거의.") == "low_hangul_ratio"
    assert _reject("보.고.싶.다.!!") == "high_symbol_ratio"
    assert _reject("제4조(국제결혼중개업의 등록) ①\n제4조(국제결혼중개업의 등록) ①") == "duplicate_lines"
    assert _reject(" ".join(["재미없음"] * 14)) == "repeated_ngrams"
    assert _reject("내 친구의 남동생의 남동생의 남동생의 남동생의 남동생의 남동생의") == "repeated_ngrams"


def test_filters_do_not_see_placeholders():
    """An address in a file of digits became "<이메일>", three Hangul syllables that passed as Korean text."""
    assert _reject("0 0 <이메일> <URL>") == "too_short"
    assert _reject("<이메일> <이메일> <이메일> <이메일> 0") == "too_short"
    assert _reject("연락은 <전화번호> 로 주세요, 영화 정말 재미있었어요") is None
    assert _reject("Contact me at <이메일> for the English subtitles") == "low_hangul_ratio"


@pytest.mark.parametrize("text", [
    "와..이런명작이...",                                                   # informal punctuation
    "공상, 과학, 가족, 오락 굿!!!",
    "맥주를 들고 웃고 있는 한 여성이 다른 웃고 있는 여자와 밖에 앉아 있다.",   # one repeated 2-gram (KorSTS)
    "나를 사랑하지 않는 사람하고 계속 가는 건 나 자신을 사랑하지 않는 사람들이나 하는 일이에요.",
    "2024년 1월 15일 개봉, 관객 1,000,000명 돌파! 평점 9.5점",
    "제1조(목적) 이 법은 국민의 권리를 보호함을 목적으로 한다.\n제2조(정의) 이 법에서 사용하는 용어의 뜻은 다음과 같다.",
])
def test_natural_korean_passes(text):
    assert _reject(text) is None


# ---------------------------------------------------------------------------------------------- real reviews


def test_real_reviews_keep_their_numbers():
    """On 30k NSMC reviews: a review no PII rule matched keeps every digit (dates, scores, prices, years), and
    every review stays NFC, capped and tidy."""
    cleaner = clean.Cleaner(_settings())
    pii = collections.Counter()
    with gzip.open(KO / "nsmc_reviews.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in itertools.islice(f, 30_000):
            text = json.loads(line)["text"]
            out, drop, touched = cleaner.clean(text)
            rules = {t.rule for t in touched}
            assert unicodedata.is_normalized("NFC", out) and out == out.strip() and drop is None
            assert not re.search(r"([^\d\s])\1{3}", out)
            if not rules & set(clean.PLACEHOLDERS):
                assert re.findall(r"\d", out) == re.findall(r"\d", text), text
            pii.update(rules & set(clean.PLACEHOLDERS))
    assert sum(pii.values()) < 30  # a handful of reviews ask for files by e-mail; nothing else looks personal


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("override", ["data.phone_action=mask", "data.max_symbol_ratio=1.5", "data.max_repeat=-1",
                                      "data.dedup.bands=0", "data.dedup.rows=2000", "data.min_hangul_ratio=-0.1"])
def test_bad_cleaning_config_is_one_error(override):
    with pytest.raises(KslmError, match=override.split("=")[0].replace(".", r"\.")):
        config.load(None, [override])
