"""The one exception type for mistakes a user can make, and how a library's error becomes part of one line.

Raise UserError("what is wrong; how to fix it") anywhere; the CLI prints it as one line
and exits non-zero, with no traceback.
"""


import unicodedata


class UserError(Exception):
    pass


# what must never reach a terminal or a log line from a name someone else chose: control and format characters
# (a newline forges a line, an escape sequence or a bidi override rewrites what is shown), surrogates, separators
UNPRINTABLE = {"Cc", "Cf", "Cs", "Zl", "Zp"}


def printable(text: str) -> bool:
    return not any(unicodedata.category(c) in UNPRINTABLE for c in text)


def shown(text: str) -> str:
    """`text` safe on one line of output: each unprintable character escaped as a Python string literal writes it,
    a byte of a non-UTF-8 file name (surrogateescape) as that byte, \\xNN."""
    def escape(c: str) -> str:
        if unicodedata.category(c) not in UNPRINTABLE:
            return c
        return f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else c.encode("unicode_escape").decode()

    return "".join(escape(c) for c in text)


def first_line(e: BaseException | str, limit: int = 160, empty: str = "no detail") -> str:
    """The first non-empty line of an exception's message, cut at `limit` characters: what a one-line error quotes
    of a library's (possibly multi-line, possibly empty) message."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[0][:limit] if lines else (type(e).__name__ if isinstance(e, BaseException) else empty)


def quoted(value, limit: int = 120) -> str:
    """A value someone else chose, for a one-line message: repr'd (control characters escaped), cut to `limit`."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
