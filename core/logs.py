"""Log lines that input cannot forge: control characters in a record's arguments are escaped when formatted.

A catalog file named `a.png\\n2025-01-01 ERROR cirflow: index deleted` logged with `"%s", uri` would print a
second, forged line. The code's own format string (`record.msg`, when a str) is left alone, and so is a traceback
(`exc_info`): both are ours, and a traceback must print on its lines. Only the values substituted into the
message are escaped, as `repr` does (`\\n`, `\\r`, `\\t`, `\\x1b`, ...): C0 and C1 controls, DEL, and the Unicode
line and paragraph separators. Numbers pass untouched, so `%d` and `%.2f` format as before.
"""

from __future__ import annotations

import copy
import logging
import numbers
from collections.abc import Mapping
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))} | {
    ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def escape_controls(text: str) -> str:
    """`text` with every control character written as its escape sequence: one line, however it was made."""
    return text.translate(_ESCAPES)


class _Escaped:
    """An argument as `%s` and `%r` see it, escaped; `%d` and `%f` reach the value's own number."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        return escape_controls(str(self.value))

    def __repr__(self) -> str:
        return escape_controls(repr(self.value))

    def __int__(self) -> int:
        return int(self.value)

    def __float__(self) -> float:
        return float(self.value)

    def __index__(self) -> int:
        return self.value.__index__()


def _escape(value: Any) -> Any:
    return value if isinstance(value, numbers.Number) else _Escaped(value)


class EscapingFormatter(logging.Formatter):
    """A Formatter whose records' arguments are escaped (module docstring); other handlers see them unchanged."""

    def format(self, record: logging.LogRecord) -> str:
        if record.args or not isinstance(record.msg, str):
            record = copy.copy(record)  # the record is shared with every other handler
            if not isinstance(record.msg, str):  # `log.error(exc)`: a value, not a format string of ours
                record.msg = escape_controls(str(record.msg))
            if isinstance(record.args, Mapping):  # `log.info("%(uri)s", {"uri": ...})`
                record.args = {k: _escape(v) for k, v in record.args.items()}
            elif record.args:
                record.args = tuple(_escape(v) for v in record.args)
        return super().format(record)


def configure_logging(level: int | str) -> None:
    """The root logger to stderr at `level`, with escaped arguments; a no-op where the root logger has
    handlers already (as logging.basicConfig)."""
    handler = logging.StreamHandler()
    handler.setFormatter(EscapingFormatter(FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
