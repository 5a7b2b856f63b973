"""cirflow.core.logs: a value logged with %s cannot start a log line of its own; tracebacks still print whole."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from cirflow.core.logs import FORMAT, EscapingFormatter, escape_controls

FORGED = "shop/a.png\n2025-01-01 00:00:00,000 ERROR cirflow: FAKE ERROR"


def record(msg: object, *args: object, exc_info: object = None) -> logging.LogRecord:
    return logging.LogRecord("cirflow.test", logging.INFO, __file__, 1, msg, args or None, exc_info)


def test_an_argument_with_a_newline_stays_on_one_line() -> None:
    line = EscapingFormatter("%(message)s").format(record("embedded %s (%d rows)", FORGED, 3))
    assert line == "embedded shop/a.png\\n2025-01-01 00:00:00,000 ERROR cirflow: FAKE ERROR (3 rows)"


@pytest.mark.parametrize("char, shown", [("\r", "\\r"), ("\x1b", "\\x1b"), ("\x00", "\\x00"), ("\x7f", "\\x7f"),
                                         ("\x85", "\\x85"), ("\x9b", "\\x9b"), ("\u2028", "\\u2028"),
                                         ("\t", "\\t")])
def test_every_control_character_is_escaped(char: str, shown: str) -> None:
    assert escape_controls(f"a{char}b") == f"a{shown}b"
    assert EscapingFormatter("%(message)s").format(record("%s", f"a{char}b")) == f"a{shown}b"


def test_other_arguments_and_the_format_string_are_untouched() -> None:
    import numpy as np

    formatter = EscapingFormatter("%(message)s")
    assert formatter.format(record("%d %.2f %x %r %s", np.int64(7), 0.5, 255, "é\n", Path("x/y"))) == \
        "7 0.50 ff 'é\\n' x/y"
    assert formatter.format(record("two\nlines of ours")) == "two\nlines of ours"
    assert formatter.format(record("%(uri)s", {"uri": "a\nb"})) == "a\\nb"
    assert formatter.format(record(ValueError(FORGED))).count("\n") == 0  # `log.error(exc)`: a value too
    # The record itself is not changed: other handlers (pytest's capture, a JSON handler) see the real value.
    original = record("%s", FORGED)
    formatter.format(original)
    assert original.args == (FORGED,) and original.getMessage().count("\n") == 1


def test_a_traceback_still_prints_on_its_lines() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        text = EscapingFormatter("%(message)s").format(record("failed on %s", FORGED, exc_info=sys.exc_info()))
    lines = text.splitlines()
    assert lines[0] == "failed on shop/a.png\\n2025-01-01 00:00:00,000 ERROR cirflow: FAKE ERROR"
    assert lines[1] == "Traceback (most recent call last):" and lines[-1] == "RuntimeError: boom"


def test_the_cli_logs_a_value_from_its_input_on_one_line(tmp_path: Path) -> None:
    # End to end: `cirflow eval` on a checkpoint path with a newline; its "not found" error is logged with %s.
    checkpoint = tmp_path / "none.pt\n2025-01-01 00:00:00,000 ERROR cirflow: FAKE ERROR"
    done = subprocess.run([sys.executable, "-m", "cirflow.flows.cli", "eval", "--checkpoint", str(checkpoint)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and " ERROR cirflow: " in lines[0] and lines[0].endswith("not found"), done.stderr
    assert "none.pt\\n2025-01-01" in lines[0]


def test_configure_logging_formats_as_before(tmp_path: Path) -> None:
    script = ("import logging\nfrom cirflow.core.logs import configure_logging\nconfigure_logging('INFO')\n"
              "logging.getLogger('cirflow.x').info('uri %s', 'a\\nFAKE ERROR')\n"
              "logging.getLogger('cirflow.x').debug('hidden')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert FORMAT == "%(asctime)s %(levelname)s %(name)s: %(message)s"
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].endswith(" INFO cirflow.x: uri a\\nFAKE ERROR")
