"""Wikipedia XML and NamuWiki JSON dumps written by the tests: streaming, markup to prose, damaged dumps."""
from __future__ import annotations

import bz2
import collections
import json
import tracemalloc
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
import zstandard

from kslm_jax.data import jsonstream, namuwiki, rawio, sources, wikitext


def _read(path):
    stats = collections.Counter()
    return list(sources.read_file(Path(path), "paragraph", "text", stats)), stats


def _zst(raw: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(raw)


# ---------------------------------------------------------------------------------------------- Wikipedia

SEOUL = """{{다른 뜻|서울|{{중첩 틀|a={{더 깊은|x}}}}}}
{{도시 정보
| 이름 = 서울특별시
| 인구 = {{formatnum:9668465}}
}}
'''서울특별시'''(서울特別市)는 [[대한민국]]의 [[수도 (도시)|수도]]이다.<ref name="a">{{웹 인용|url=http://x.kr|제목=출처}}</ref> \
인구는 약 960만 명이다.<ref name="b"/>
<!-- 숨은 주석 [[링크]] -->
[[파일:Seoul.jpg|섬네일|서울의 [[야경]] 사진]]

== 역사 ==
''조선''의 도읍 [[한양]]이었다. [http://example.com 공식 누리집]을 보라.
{| class="wikitable"
|-
! 구 !! 인구
|-
| 종로구 || {{formatnum:150000}}
|}
* 한강이 도시를 가로지른다.
[[분류:대한민국의 도시]]
[[en:Seoul]]"""
SEOUL_PROSE = ("서울특별시(서울特別市)는 대한민국의 수도이다. 인구는 약 960만 명이다.\n\n역사\n"
               "조선의 도읍 한양이었다. 공식 누리집을 보라.\n한강이 도시를 가로지른다.")
PAGES = [("서울특별시", 0, 1, None, SEOUL), ("서울", 0, 2, "서울특별시", "#넘겨주기 [[서울특별시]]"),
         ("틀:도시 정보", 10, 3, None, "{{{이름}}} 틀 문서입니다."),
         ("부산광역시", 0, 4, None, "'''부산광역시'''는 [[대한민국]] 제2의 도시이다.")]


def _wiki_xml(pages) -> bytes:
    body = "".join(f"  <page>\n    <title>{escape(t)}</title>\n    <ns>{ns}</ns>\n    <id>{i}</id>\n"
                   + (f'    <redirect title="{escape(r)}" />\n' if r else "")
                   + f'    <revision><id>{i * 10}</id><text bytes="{len(x)}" xml:space="preserve">{escape(x)}'
                   "</text></revision>\n  </page>\n" for t, ns, i, r, x in pages)
    return ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/" version="0.11" xml:lang="ko">\n'
            f"  <siteinfo><sitename>위키백과</sitename></siteinfo>\n{body}</mediawiki>\n").encode("utf-8")


def test_wikipedia_dump(tmp_path):
    path = tmp_path / "kowiki-20240101-pages-articles.xml.bz2"
    path.write_bytes(bz2.compress(_wiki_xml(PAGES)))
    docs, stats = _read(path)
    assert [d.text for d in docs] == [SEOUL_PROSE, "부산광역시는 대한민국 제2의 도시이다."]
    assert [d.meta["title"] for d in docs] == ["서울특별시", "부산광역시"]
    assert [d.id for d in docs] == [f"{path}:1", f"{path}:4"]
    assert stats == {"redirect": 1, "other_namespace": 1}
    # cut inside the last page: the pages before it stay, the file is counted as truncated
    raw = _wiki_xml(PAGES)
    cut = tmp_path / "kowiki-cut-pages-articles.xml"
    cut.write_bytes(raw[: raw.index("제2의".encode("utf-8"))])
    docs, stats = _read(cut)
    assert [d.text for d in docs] == [SEOUL_PROSE] and stats == {"redirect": 1, "other_namespace": 1,
                                                                 "file:truncated": 1}


def test_wikitext_details():
    assert wikitext.to_prose("앞 {{{변수|기본}}} 뒤 {{틀}}") == "앞  뒤"
    assert wikitext.to_prose("}} 짝 없는 닫기") == "}} 짝 없는 닫기"
    assert wikitext.to_prose("[[a|b]] [[c]]s [[:분류:x]] [[MBC: 뉴스]] [[ko:x]] [[en:y|영어]]") == \
        "b cs 분류:x MBC: 뉴스  영어"
    assert wikitext.to_prose("열림 {{닫히지 않은 틀") == "열림 {{닫히지 않은 틀"
    assert wikitext.to_prose("본문<ref>각주 {{틀}}") == "본문각주"  # an unclosed <ref> only loses its opener
    assert wikitext.to_prose("가<!-- 닫히지 않은 주석") == "가"
    assert wikitext.to_prose("== 제목 ==\n; 용어 : 뜻\n----\n'''''굵은 기울임'''''<br/>다음") == \
        "제목\n용어 : 뜻\n\n굵은 기울임\n다음"


# ---------------------------------------------------------------------------------------------- NamuWiki

NAMU_TEXT = """{{{#!wiki style="border:1px solid"
{{{#!folding [ 펼치기 · 접기 ]
'''나무위키'''는 [[위키]] 사이트이다.}}}}}}
[include(틀:상위 문서, top1=위키)]
[목차]
== 개요 ==
[[대한민국|한국]]의 {{{#red 위키}}} 사이트이다.[* 각주 안의 [[링크]]도 지운다.] ~~취소선 내용~~ __밑줄__ 글자.
{{{#!html <div>html</div>}}}
||<tablealign=center> 항목 || 내용 ||
|| 설립 || 2015년 ||
[[파일:로고.png|width=100]]
[각주]
[[분류:위키]]"""
NAMU_PROSE = "나무위키는 위키 사이트이다.\n\n개요\n한국의 위키 사이트이다.  밑줄 글자.\n\n항목 내용\n설립 2015년"
NAMU_RECORDS = [
    {"namespace": "0", "title": "나무위키", "text": NAMU_TEXT, "contributors": ["a", "b"]},
    {"namespace": "0", "title": "나무", "text": "#redirect 나무위키", "contributors": []},
    {"namespace": "1", "title": "틀:상위 문서", "text": "틀 본문입니다.", "contributors": []},
    {"namespace": "0", "title": "깨진 기록", "contributors": []},
    {"namespace": "0", "title": "서울", "text": "'''서울'''은 [[대한민국]]의 수도이다.", "contributors": ["c"]},
]


def test_namuwiki_dump_streamed(tmp_path, monkeypatch):
    path = tmp_path / "namuwiki_20210301.json.zst"
    raw = json.dumps(NAMU_RECORDS, ensure_ascii=False).encode("utf-8")
    path.write_bytes(_zst(raw))
    want = [NAMU_PROSE, "서울은 대한민국의 수도이다."]
    docs, stats = _read(path)
    assert [d.text for d in docs] == want and [d.meta["title"] for d in docs] == ["나무위키", "서울"]
    assert stats == {"redirect": 1, "other_namespace": 1, "missing_text_field": 1}
    # tiny chunks: every element and many strings and escapes span chunk boundaries
    monkeypatch.setattr(rawio, "CHUNK", 7)
    monkeypatch.setattr(rawio, "SAMPLE", 7)
    again, stats = _read(path)
    assert [d.text for d in again] == want and [d.id for d in again] == [d.id for d in docs]
    # cut in the middle of the last element, then a broken element in the middle
    path.write_bytes(_zst(raw[: raw.index("수도이다".encode("utf-8"))]))
    docs, stats = _read(path)
    assert [d.text for d in docs] == [NAMU_PROSE] and stats["file:truncated"] == 1
    broken = raw.replace(b'"title": "\xea\xb9\xa8', b'"title": \xea\xb9\xa8')  # an unquoted string
    path.write_bytes(_zst(broken))
    docs, stats = _read(path)
    assert [d.text for d in docs] == [NAMU_PROSE] and stats["file:bad_json"] == 1


def test_namuwiki_memory_is_bounded_by_the_largest_element(tmp_path, monkeypatch):
    """With 64 KiB reads, a 5 MB dump is decoded holding a few chunks, not the file."""
    monkeypatch.setattr(rawio, "CHUNK", 1 << 16)
    monkeypatch.setattr(rawio, "SAMPLE", 1 << 16)
    record = {"namespace": "0", "title": "문서", "text": "나무위키 문서의 본문입니다. " * 120, "contributors": ["x"]}
    raw = json.dumps([dict(record, title=f"문서 {i}") for i in range(1000)], ensure_ascii=False).encode("utf-8")
    path = tmp_path / "namuwiki.json"
    path.write_bytes(raw)
    del raw
    tracemalloc.start()
    try:
        n = sum(1 for _ in sources.read_file(path, "paragraph", "text", collections.Counter()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 1000
    assert path.stat().st_size > 4_000_000 and peak < 16 * rawio.CHUNK, peak


def test_json_array_stream_edge_cases():
    def elements(text, size=3):
        return list(jsonstream.iter_array((text[i:i + size] for i in range(0, len(text), size)), 1000))
    assert elements(" [ 12345 , -1.5e3, true, null, \"a\\\"b\", {\"k\": [1, 2]} ] ") == \
        [12345, -1500.0, True, None, 'a"b', {"k": [1, 2]}]
    assert elements("[]") == []
    for text, reason in (("{}", "not_an_array"), ("", "not_an_array"), ("[1, 2", "truncated"),
                         ("[1 2]", "bad_json"), ('["' + "x" * 5000 + '"]', "record_too_long")):
        with pytest.raises(rawio.BadFile) as e:
            elements(text)
        assert e.value.reason == reason, text


def test_namumark_details():
    assert namuwiki.is_redirect("#넘겨주기 다른 문서") and not namuwiki.is_redirect("넘겨주기")
    assert namuwiki.to_prose("[[문서#s-1]] [[https://x.kr|바깥]] [br]줄 [ruby(漢字, ruby=한자)]") == "문서 바깥\n줄 漢字"
    assert namuwiki.to_prose("{{{+1 큰 글씨}}} {{{#!syntax python\nprint()}}} {{{문자 그대로}}}") == "큰 글씨  문자 그대로"
    assert namuwiki.to_prose("앞[* 닫히지 않은 각주") == "앞[* 닫히지 않은 각주"
    assert namuwiki.to_prose("## 주석 줄\n> 인용문\n * 목록 항목\n==# 접힌 제목 #==") == "인용문\n목록 항목\n접힌 제목"
