"""Reading the small text files someone may have sent: a run folder's records, a dataset's or shards' metadata, a
recipe. Each read is bounded in size and nesting depth, and everything that can go wrong (a directory where a file
should be, bytes that are not UTF-8, a 200,000-deep `[[[`, a YAML alias bomb, the wrong type) is one UserError line
naming the file, never a traceback or unbounded memory.
"""

import json
from pathlib import Path

import yaml

from warmstart.errors import UserError, first_line

MAX_BYTES = 16 * 2**20  # metadata, configs, class lists: far below this; a prepared.json lists ~1,300 files
MAX_DEPTH = 32          # no record warmstart writes nests deeper than a few levels


def read_text(path, what: str = "", limit: int = MAX_BYTES) -> str:
    """The file's text (UTF-8), or one line: missing, not a file, larger than `limit`, or not text."""
    path, what = Path(path), what or Path(path).name
    if not path.is_file():  # a directory, a FIFO (whose open would block), a dangling link, nothing
        raise UserError(f"{what} at {path} is {'not a regular file' if path.exists() else 'missing'}; it should be a "
                        f"file warmstart wrote")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise UserError(f"cannot read {what} at {path} ({first_line(e.strerror or str(e))}); it should be a file "
                        f"warmstart wrote") from None
    return text_of(data, path, what, limit)


def text_of(data: bytes, where, what: str, limit: int = MAX_BYTES) -> str:
    """Bytes read from `where` (at most limit + 1 of them) as UTF-8 text, or one line: over the limit, or not text."""
    if len(data) > limit:
        raise UserError(f"{where} is larger than {limit // 2**20} MB, far beyond any {what} warmstart writes; it was "
                        f"edited or is not what it says")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where} is not UTF-8 text (byte {e.start}); it was edited or is not a {what}") from None


def _depth(value, limit: int) -> int:
    """The nesting depth of parsed JSON/YAML, walked without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        deepest = max(deepest, d)
        if d > limit:
            break
        if isinstance(v, dict):
            todo += [(x, d + 1) for x in v.values()]
        elif isinstance(v, list):
            todo += [(x, d + 1) for x in v]
    return deepest


def parse_json(text: str, where, expect: type = dict, depth: int = MAX_DEPTH):
    """JSON text as `expect` (dict, list, or object for any), or one line naming `where`."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise UserError(f"{where} is not valid JSON ({first_line(e, 120)}); it was edited or truncated") from None
    _check_shape(value, where, expect, depth)
    return value


def read_json(path, what: str = "", expect: type = dict, limit: int = MAX_BYTES):
    return parse_json(read_text(path, what, limit), path, expect)


class _NoAliases(yaml.SafeLoader):
    """safe_load's loader, refusing anchors and aliases: a 400-byte 'billion laughs' expands to gigabytes, and no
    config warmstart writes uses them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None):
            event = self.peek_event()
            raise yaml.YAMLError(f"anchors and aliases (&/*) are not accepted, line {event.start_mark.line + 1}")
        return super().compose_node(parent, index)


def parse_yaml(text: str, where, expect: type = dict, depth: int = MAX_DEPTH):
    """YAML text (no anchors or aliases) as `expect`; an empty document is an empty `expect`; else one line."""
    try:
        value = yaml.load(text, Loader=_NoAliases)
    except (yaml.YAMLError, RecursionError) as e:
        raise UserError(f"{where} is not valid YAML: {first_line(e, 200)}") from None
    if value is None:
        return expect() if expect is not object else None
    _check_shape(value, where, expect, depth)
    return value


def _check_shape(value, where, expect: type, depth: int) -> None:
    if expect is not object and not isinstance(value, expect):
        raise UserError(f"{where} holds a {type(value).__name__}, expected a "
                        f"{'mapping' if expect is dict else expect.__name__}; it was edited or is not what it says")
    if _depth(value, depth) > depth:
        raise UserError(f"{where} nests deeper than {depth} levels; it was edited or is not what it says")
