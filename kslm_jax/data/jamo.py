"""Sub-character pre-tokenization: SentencePiece sees Hangul syllables as their jamo, decode puts them back.

A syllable such as 한 is written as its three conjoining jamo ᄒ ᅡ ᆫ, and one without a final consonant
(하) as ᄒ ᅡ FILLER, so every syllable is exactly three characters and a piece can end after a vowel
without saying whether a final follows. Everything else (compatibility jamo ㅋㅋ, Hanja, emoji, Latin,
whitespace) is kept as it is, except the characters this view itself uses: a conjoining jamo that
`decompose` can emit, FILLER or ESCAPE already present in the text is written ESCAPE + that character. So is
SentencePiece's own whitespace mark ▁ (U+2581), as ESCAPE + "_": SentencePiece decodes a ▁ in the text as a
space, so plain SentencePiece does not round-trip it, and this view does.

Why that is a bijection on every string (not only NFC ones): the view of each input character is one of
  L V T | L V FILLER    (a syllable; L is one of the 19 modern initials, never emitted on its own)
  ESCAPE c              (c is a reserved character: an initial, vowel or final that syllables emit, FILLER,
                         or ESCAPE; or c is "_", standing for ▁)
  c                     (any other character)
and no such word is a prefix of another (an L or ESCAPE only ever opens a syllable or an escape), so the
concatenation is read back unambiguously, left to right: `recompose(decompose(x)) == x`.

FILLER and ESCAPE are Hangul-script characters (HALFWIDTH HANGUL FILLER, HANGUL CHOSEONG FILLER), both
all but absent from real text; SentencePiece never lets a piece span two scripts, so a filler from
another script would cut every open syllable out of the pieces around it.
"""
from __future__ import annotations

import re

import sentencepiece as spm

FILLER = "\uffa0"
ESCAPE = "\u115f"
_S0, _L0, _V0, _T0 = 0xAC00, 0x1100, 0x1161, 0x11A7
_NL, _NV, _NT = 19, 21, 28
LEADS = "".join(chr(_L0 + i) for i in range(_NL))
VOWELS = "".join(chr(_V0 + i) for i in range(_NV))
TAILS = "".join(chr(_T0 + i) for i in range(1, _NT))  # index 0 is "no final": FILLER
RESERVED = LEADS + VOWELS + TAILS + FILLER + ESCAPE
# The 51 compatibility letters ㄱ..ㅣ, which a keyboard shows for a letter typed on its own (ㅋㅋ, or a typo's
# leftover). They stay themselves in the view; training requires them all, so none of them falls back to bytes.
LETTERS = "".join(chr(c) for c in range(0x3131, 0x3164))
SPACE_MARK = "\u2581"


def parts(ch: str) -> tuple[int, int, int] | None:
    """(initial, vowel, final) indices of a precomposed syllable (final 0: none), or None for any other character."""
    s = ord(ch) - _S0
    if not 0 <= s < _NL * _NV * _NT:
        return None
    return s // (_NV * _NT), s // _NT % _NV, s % _NT


def compose(lead: int, vowel: int, tail: int = 0) -> str:
    return chr(_S0 + (lead * _NV + vowel) * _NT + tail)


def _view(lead: int, vowel: int, tail: int) -> str:
    return chr(_L0 + lead) + chr(_V0 + vowel) + (chr(_T0 + tail) if tail else FILLER)


_DECOMPOSE = {_S0 + i: _view(*parts(chr(_S0 + i))) for i in range(_NL * _NV * _NT)}
_DECOMPOSE.update({ord(c): ESCAPE + c for c in RESERVED})
_DECOMPOSE[ord(SPACE_MARK)] = ESCAPE + "_"
_SYLLABLE = {v: chr(k) for k, v in _DECOMPOSE.items() if len(v) == 3}
# In the order tried at each position: an escape; a whole syllable; then what only model output can hold
# (a syllable cut before its final, a stray filler, an escape at the very end), decoded to the nearest text.
_READ = re.compile(f"{ESCAPE}(.?)|[{LEADS}][{VOWELS}][{TAILS}{FILLER}]|([{LEADS}][{VOWELS}])|{FILLER}", re.DOTALL)


def _read(m: re.Match) -> str:
    if m.group(1) is not None:
        return SPACE_MARK if m.group(1) == "_" else m.group(1)
    if m.group(2) is not None:
        return _SYLLABLE[m.group(2) + FILLER]
    return _SYLLABLE.get(m.group(), "")


def decompose(text: str, protect: re.Pattern | None = None) -> str:
    """The jamo view of `text`; spans matching `protect` (special tokens such as <|사용자|>) are kept whole."""
    if protect is None:
        return text.translate(_DECOMPOSE)
    out, at = [], 0
    for m in protect.finditer(text):
        out += [text[at:m.start()].translate(_DECOMPOSE), m.group()]
        at = m.end()
    out.append(text[at:].translate(_DECOMPOSE))
    return "".join(out)


def recompose(text: str) -> str:
    """The text whose jamo view is `text`: exact for every output of `decompose`, and total on any string."""
    return _READ.sub(_read, text)


def protect_pattern(specials) -> re.Pattern | None:
    """Special tokens to keep whole; one holding a reserved character is left out (it is decomposed and escaped
    like text, which still round-trips: only its being one piece is lost)."""
    keep = sorted((s for s in specials if not any(c in RESERVED + SPACE_MARK for c in s)), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, keep))) if keep else None


def is_jamo_model(proto) -> bool:
    """Trained by `tokenizer.train` with pretokenize=jamo: it required FILLER and ESCAPE in its alphabet."""
    return FILLER in proto.trainer_spec.required_chars and ESCAPE in proto.trainer_spec.required_chars


# The letters a 2-set keyboard types for each initial, vowel and final (what is left of a broken syllable).
_TYPED = ("ㄱㄲㄴㄷㄸㄹㅁㅂㅃㅅㅆㅇㅈㅉㅊㅋㅌㅍㅎ", "".join(chr(0x314F + i) for i in range(_NV)),
          " ㄱㄲㄳㄴㄵㄶㄷㄹㄺㄻㄼㄽㄾㄿㅀㅁㅂㅄㅅㅆㅇㅈㅊㅋㅌㅍㅎ")


def _typo(ch: str, rng) -> str:
    """One syllable with one of its jamo swapped for another of its kind, dropped, or typed twice."""
    jamos = list(parts(ch))
    which = rng.randrange(3 if jamos[2] else 2)
    op = rng.choice(("swap", "drop", "double"))
    if op == "swap":
        others = [j for j in range(which == 2, (_NL, _NV, _NT)[which]) if j != jamos[which]]
        jamos[which] = rng.choice(others)
        return compose(*jamos)
    letters = [_TYPED[k][j] for k, j in enumerate(jamos) if k < 2 or j]
    if op == "double":
        return letters[0] + ch if which == 0 else ch + letters[which]
    if which == 2:
        return compose(jamos[0], jamos[1])
    return "".join(letters[:which] + letters[which + 1:])


def inject_typos(text: str, rate: float, rng) -> str:
    """`text` with a typo in each Hangul syllable with probability `rate` (a robustness benchmark's noise).

    The result is what a 2-set keyboard shows: 각 with its final dropped is 가; with its vowel dropped, ㄱㄱ; with
    its vowel typed twice, 각ㅏ; with a jamo swapped, e.g. 걱 or 간. `rng` is a random.Random.
    """
    return "".join(_typo(c, rng) if parts(c) and rng.random() < rate else c for c in text)


class JamoTokenizer(spm.SentencePieceProcessor):
    """A SentencePieceProcessor over the jamo view: Encode decomposes first, Decode recomposes after.

    Ids and pieces (IdToPiece, out_type=str) are those of the jamo view; text in and text out is the original.
    """

    def __init__(self, proto, protect: tuple[str, ...] = ()):
        """`proto`: the parsed ModelProto; `protect`: its special tokens, which stay whole."""
        super().__init__(model_proto=proto.SerializeToString())
        self._protect = protect_pattern(protect)

    def Encode(self, input, out_type=None, **kwargs):  # noqa: N802 (SentencePiece's name)
        if kwargs.get("return_type") not in (None, int, str, "numpy") or out_type not in (None, int, str, "numpy"):
            raise TypeError("JamoTokenizer.Encode returns ids or pieces only (offsets would be in the jamo view)")
        view = (decompose(input, self._protect) if isinstance(input, str)
                else [decompose(t, self._protect) for t in input])
        return super().Encode(view, out_type=out_type, **kwargs)

    def Decode(self, input, out_type=None, **kwargs):  # noqa: N802
        out = super().Decode(input, out_type=out_type, **kwargs)
        if isinstance(out, str):
            return recompose(out)
        if isinstance(out, list) and all(isinstance(t, str) for t in out):
            return [recompose(t) for t in out]
        raise TypeError("JamoTokenizer.Decode returns text only (offsets and protos would be in the jamo view)")

    def EncodeAsIds(self, input, **kwargs):  # noqa: N802
        return self.Encode(input, out_type=int, **kwargs)

    def EncodeAsPieces(self, input, **kwargs):  # noqa: N802
        return self.Encode(input, out_type=str, **kwargs)

    def DecodeIds(self, input, **kwargs):  # noqa: N802
        return self.Decode(input, **kwargs)

    def DecodePieces(self, input, **kwargs):  # noqa: N802
        return self.Decode(input, **kwargs)

    # SentencePiece binds its snake_case and Tokenize aliases to its own methods, not to overrides.
    encode = Tokenize = Encode
    decode = Detokenize = Decode
    encode_as_ids, encode_as_pieces = EncodeAsIds, EncodeAsPieces
    decode_ids, decode_pieces = DecodeIds, DecodePieces
