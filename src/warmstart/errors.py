"""The one exception type for mistakes a user can make, and how a library's error becomes part of one line.

Raise UserError("what is wrong; how to fix it") anywhere; the CLI prints it as one line
and exits non-zero, with no traceback.
"""


class UserError(Exception):
    pass


def first_line(e: BaseException | str, limit: int = 160, empty: str = "no detail") -> str:
    """The first non-empty line of an exception's message, cut at `limit` characters: what a one-line error quotes
    of a library's (possibly multi-line, possibly empty) message."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[0][:limit] if lines else (type(e).__name__ if isinstance(e, BaseException) else empty)
