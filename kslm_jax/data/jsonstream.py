"""The elements of one huge top-level JSON array, decoded one at a time from a text stream.

A NamuWiki dump is a single array of several GB on one line, so neither json.load nor a line reader works.
Memory stays within a small multiple of the largest single element.
"""
from __future__ import annotations

import json
import re
from typing import Iterator

from kslm_jax.data.rawio import BadFile

_WS = re.compile(r"[ \t\n\r]*")
# JSON errors that may only mean the element continues in the next chunk; a value cut after a few characters
# (tru, -1.5e) fails as "Expecting value" near the end of the buffer.
_INCOMPLETE_TAIL = 32


class _Buffer:
    def __init__(self, chunks: Iterator[str]):
        self._it = iter(chunks)
        self.text, self.pos, self.eof = "", 0, False

    def fill(self, at_least: int) -> None:
        """Drop what was consumed, then read until `at_least` characters are unconsumed or the stream ends."""
        parts, size = [self.text[self.pos:]], len(self.text) - self.pos
        while size < at_least and not self.eof:
            chunk = next(self._it, None)
            if chunk is None:
                self.eof = True
            else:
                parts.append(chunk)
                size += len(chunk)
        self.text, self.pos = "".join(parts), 0

    def peek(self) -> str:
        """The next character that is not JSON whitespace ("" at the end), without consuming it."""
        while True:
            self.pos = _WS.match(self.text, self.pos).end()
            if self.pos < len(self.text):
                return self.text[self.pos]
            if self.eof:
                return ""
            self.fill(1)


def _decode_one(buf: _Buffer, decoder: json.JSONDecoder, max_chars: int):
    while True:
        avail = len(buf.text) - buf.pos
        try:
            value, end = decoder.raw_decode(buf.text, buf.pos)
            if end < len(buf.text) or buf.eof:  # a number at the very end may go on in the next chunk
                buf.pos = end
                return value
            msg, at = "", len(buf.text)
        except json.JSONDecodeError as e:
            # only the message and position: the error holds the whole buffer, and a kept exception (with its
            # traceback cycle) keeps one buffer alive per element until the garbage collector happens to run
            msg, at = e.msg, e.pos
        except (ValueError, RecursionError) as e:  # over-long integers, deep nesting
            raise BadFile("bad_json", str(e)) from None
        if msg and not msg.startswith("Unterminated string") and at < len(buf.text) - _INCOMPLETE_TAIL:
            raise BadFile("bad_json", f"element {msg} at character {at - buf.pos}")
        if buf.eof:
            raise BadFile("truncated", "the file ends inside an element")
        if avail > max_chars:
            raise BadFile("record_too_long", f"an element is longer than {max_chars} characters")
        buf.fill(2 * avail + 1)  # doubling: re-decoding from the element's start stays linear overall


def iter_array(chunks: Iterator[str], max_chars: int) -> Iterator[object]:
    """Yield each element of the array that the stream holds. A stream that is not an array raises
    BadFile("not_an_array"); a broken one BadFile("bad_json" | "truncated") after the elements before it."""
    buf = _Buffer(chunks)
    decoder = json.JSONDecoder()
    first = buf.peek()
    if first != "[":
        raise BadFile("not_an_array", f"the file starts with {first!r}, not [" if first else "only whitespace")
    buf.pos += 1
    if buf.peek() == "]":
        return
    while True:
        yield _decode_one(buf, decoder, max_chars)
        c = buf.peek()
        if c == ",":
            buf.pos += 1
            buf.peek()
        elif c == "]":
            return
        elif c == "":
            raise BadFile("truncated", "the file ends before the array closes")
        else:
            raise BadFile("bad_json", f"{c!r} between array elements")
