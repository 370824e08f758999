"""Bytes and characters out of raw files: decompression by suffix, per-file encoding detection, bounded lines.

Nothing here raises on bad input except `BadFile`, which the dispatcher in sources.py counts per file and reason
(what was read before it stays read). Every file is opened read-only.
"""
from __future__ import annotations

import bz2
import codecs
import collections
import contextvars
import gzip
import lzma
import re
import zlib
from pathlib import Path
from typing import Iterator

CHUNK = 1 << 20          # bytes per read: memory per open file is a small multiple of this
SAMPLE = 1 << 20         # bytes the encoding and binary checks look at
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zstd")
# C0 controls that text never holds (tab, newlines, form feed and ESC excluded); UTF-8 and CP949 multibyte
# sequences never contain these bytes either, so a file with many of them is not text in either encoding.
_CONTROL_BYTES = bytes(b for b in range(32) if b not in b"\t\n\x0b\x0c\r\x1b")
BINARY_CONTROL_SHARE = 0.05


class BadFile(Exception):
    """The rest of a file cannot be read; `reason` becomes the counted key `file:<reason>`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def strip_compression(name: str) -> str:
    lower = name.lower()
    for suffix in COMPRESSED:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


class _ZstdReader:
    """Reads a .zst stream frame by frame and, unlike zstandard's stream_reader, notices a cut-off last frame."""

    _PIECE = 4096  # compressed bytes per call: one call can inflate at most ~32768x this (RLE blocks)

    def __init__(self, f):
        try:
            import zstandard
        except ImportError:
            raise BadFile("unsupported", "reading .zst needs the zstandard package: pip install zstandard") from None
        self._zstd, self._f = zstandard, f
        self._obj, self._in_frame, self._pending = None, False, b""

    def read1(self, n: int) -> bytes:
        """The output of one decompression step that produced any (it may exceed n), b"" at the end."""
        while True:
            if self._pending:
                data, self._pending = self._pending, b""
            else:
                data = self._f.read(self._PIECE)
            if not data:
                if self._in_frame:
                    raise EOFError("zstd frame cut off")
                return b""
            if self._obj is None:
                self._obj = self._zstd.ZstdDecompressor().decompressobj()
            self._in_frame = True
            try:
                piece = self._obj.decompress(data)
            except self._zstd.ZstdError as e:
                raise ValueError(f"zstd: {e}") from None
            if self._obj.eof:
                self._pending, self._obj, self._in_frame = self._obj.unused_data, None, False
            if piece:
                return piece

    def close(self):
        self._f.close()


class RawReader:
    """A read-only byte stream of one file, decompressed by suffix; damage surfaces as BadFile."""

    def __init__(self, path: Path):
        self.path, self.failed = path, None
        lower = path.name.lower()
        self.compressed = lower.endswith(COMPRESSED)
        try:
            if lower.endswith(".gz"):
                self._f = gzip.open(path, "rb")
            elif lower.endswith(".bz2"):
                self._f = bz2.open(path, "rb")
            elif lower.endswith(".xz"):
                self._f = lzma.open(path, "rb")
            elif lower.endswith((".zst", ".zstd")):
                self._f = _ZstdReader(open(path, "rb"))
            else:
                self._f = open(path, "rb")
        except OSError as e:
            raise BadFile("unreadable", str(e)) from None

    def read(self, n: int) -> bytes:
        """Up to n bytes, b"" at the end. Bytes decoded before damage are returned first; the damage is
        raised by the next call, so a truncated file still gives everything before the cut."""
        if self.failed:
            raise self.failed
        out, size = [], 0
        while size < n:
            try:
                piece = self._f.read1(n - size)
            except EOFError as e:
                self.failed = BadFile("truncated", str(e))
            except (OSError, zlib.error, lzma.LZMAError, ValueError) as e:
                self.failed = BadFile("corrupt" if self.compressed else "unreadable", str(e))
            if self.failed:
                if not out:
                    raise self.failed
                break
            if not piece:
                break
            out.append(piece)
            size += len(piece)
        return b"".join(out)

    def chunks(self) -> Iterator[bytes]:
        while data := self.read(CHUNK):
            yield data

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------- decoding

class _Decoding:
    """Per-file decode state the error handler reaches through a context variable (handlers are global)."""

    def __init__(self, alt: str | None, stats: collections.Counter):
        self.alt, self.stats = alt, stats


_CURRENT: contextvars.ContextVar[_Decoding | None] = contextvars.ContextVar("kslm_decoding", default=None)
_ALT = {"utf-8": "cp949", "cp949": "utf-8"}  # mixed files: the other legacy-or-modern encoding
_ALT_WIDTHS = {"cp949": (2,), "utf-8": (2, 3, 4)}


def _on_decode_error(exc):
    """Mixed files: a character the file's encoding cannot read is tried in the other one, else U+FFFD, counted."""
    state = _CURRENT.get()
    if not isinstance(exc, UnicodeDecodeError) or state is None:
        raise exc
    if state.alt:
        for width in _ALT_WIDTHS[state.alt]:
            piece = exc.object[exc.start:exc.start + width]
            if len(piece) < width:
                break
            try:
                ch = piece.decode(state.alt)
            except UnicodeDecodeError:
                continue
            if len(ch) == 1 and not 0xD800 <= ord(ch) <= 0xDFFF:
                state.stats["other_encoding_chars"] += 1
                return ch, exc.start + width
    state.stats["undecodable_chars"] += 1
    return "\ufffd", exc.end


codecs.register_error("kslm-count", _on_decode_error)


def sniff(sample: bytes, at_eof: bool) -> tuple[str, int]:
    """(codec, BOM length) of a file from its first bytes: BOMs, then strict UTF-8, then strict CP949,
    then whichever of the two reads the sample with fewer errors."""
    if sample.startswith(codecs.BOM_UTF8):
        return "utf-8", 3
    if sample.startswith(codecs.BOM_UTF16_LE):
        return "utf-16-le", 2
    if sample.startswith(codecs.BOM_UTF16_BE):
        return "utf-16-be", 2
    for enc in ("utf-8", "cp949"):
        try:
            codecs.getincrementaldecoder(enc)("strict").decode(sample, at_eof)
            return enc, 0
        except UnicodeDecodeError:
            continue
    errors, part = {}, sample[:65536]  # a damaged or mixed file: counting calls Python per error
    for enc in ("utf-8", "cp949"):
        counts: collections.Counter = collections.Counter()
        decoder = codecs.getincrementaldecoder(enc)("kslm-count")
        _decode_with(decoder, part, at_eof and len(part) == len(sample), _Decoding(None, counts))
        errors[enc] = counts["undecodable_chars"]
    return ("cp949" if errors["cp949"] < errors["utf-8"] else "utf-8"), 0


def _decode_with(decoder, data: bytes, final: bool, state: _Decoding) -> str:
    token = _CURRENT.set(state)  # set and reset around the call: no generator yields in between
    try:
        return decoder.decode(data, final)
    finally:
        _CURRENT.reset(token)


def looks_binary(sample: bytes) -> bool:
    return len(sample) - len(sample.translate(None, _CONTROL_BYTES)) > BINARY_CONTROL_SHARE * len(sample)


def _note_encoding(enc: str, stats: collections.Counter) -> None:
    if enc == "cp949":
        stats["encoding:cp949"] += 1
    elif enc.startswith("utf-16"):
        stats["encoding:utf-16"] += 1


def decode_bytes(raw: bytes, stats: collections.Counter) -> str:
    """Decode a whole byte string the way the streaming readers decode a file."""
    enc, bom = sniff(raw[:SAMPLE], len(raw) <= SAMPLE)
    _note_encoding(enc, stats)
    decoder = codecs.getincrementaldecoder(enc)("kslm-count")
    return _decode_with(decoder, raw[bom:], True, _Decoding(_ALT.get(enc), stats))



def text_chunks(raw: RawReader, stats: collections.Counter) -> Iterator[str]:
    """Decoded text of a file in pieces of about CHUNK bytes. Empty and binary files raise BadFile."""
    first = raw.read(SAMPLE)
    if not first:
        raise BadFile("empty")
    enc, bom = sniff(first, len(first) < SAMPLE and not raw.failed)
    if not enc.startswith("utf-16") and looks_binary(first):
        raise BadFile("binary")
    _note_encoding(enc, stats)
    decoder = codecs.getincrementaldecoder(enc)("kslm-count")
    state = _Decoding(_ALT.get(enc), stats)
    data = first[bom:]
    while True:
        try:
            more = raw.read(CHUNK)
        except BadFile:
            if text := _decode_with(decoder, data, False, state):
                yield text  # what came before the damage; its unfinished last record is dropped
            raise
        text = _decode_with(decoder, data, not more, state)
        if text:
            yield text
        if not more:
            return
        data = more


# ---------------------------------------------------------------------------------------------- lines

# Separators: JSON lines end at \n, \r\n or \r only (json.dumps leaves U+2028 raw inside strings); text lines
# end where str.splitlines() ends them; paragraphs are built from \n-terminated lines.
JSONL_SEP = re.compile(r"(\r\n|\r|\n)")
SPLITLINES_SEP = re.compile("(\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029])")
NEWLINE_SEP = re.compile(r"(\r\n|\n)")


def lines(chunks: Iterator[str], sep: re.Pattern, max_chars: int, stats: collections.Counter,
          keepends: bool = False) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) over a text stream. A line longer than max_chars is never held in
    memory: it is skipped and counted as record_too_long, so one 200 MB line costs at most max_chars."""
    parts: list[str] = []
    size, lineno, overlong, held = 0, 0, False, ""
    for chunk in chunks:
        if held:
            chunk, held = held + chunk, ""
        if chunk.endswith("\r"):  # its \n may open the next chunk
            chunk, held = chunk[:-1], "\r"
        pieces = sep.split(chunk)
        for i in range(1, len(pieces), 2):
            piece = pieces[i - 1]
            lineno += 1
            if overlong or size + len(piece) > max_chars:
                stats["record_too_long"] += 1
                parts, size, overlong = [], 0, False
                continue
            line = "".join(parts) + piece if parts else piece
            parts, size = [], 0
            yield lineno, (line + pieces[i] if keepends else line)
        tail = pieces[-1]
        if not overlong:
            if size + len(tail) > max_chars:
                parts, size, overlong = [], 0, True
            elif tail:
                parts.append(tail)
                size += len(tail)
    if held and not sep.fullmatch(held):  # a lone \r is text to a \n-only separator
        parts.append(held)
        held = ""
    if overlong or parts or held:
        lineno += 1
        if overlong:
            stats["record_too_long"] += 1
        else:
            yield lineno, "".join(parts) + (held if keepends else "")
