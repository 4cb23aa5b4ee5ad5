"""Browser checks: list the screenshots they wrote (and their timings) at the end of the pytest run.

A browser test records each screenshot with ``record_property("screenshot", "<name>: <path>")`` and
its phase timings with ``record_property("timing", "...")``; the terminal summary prints them, so a
CI log names the artifacts even when the test passed (pytest hides the ``print`` output of passing
tests).
"""

from __future__ import annotations

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = []
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) != "call":
                continue
            lines += [f"{name}: {value}" for name, value in getattr(report, "user_properties", ())
                      if name in ("screenshot", "timing")]
    if lines:
        terminalreporter.section("browser check")
        for line in lines:
            terminalreporter.write_line(line)
