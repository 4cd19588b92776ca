"""The ``slow`` marker: a plain ``pytest`` skips slow tests (saying how to run them), ``-m slow`` runs them and
``-m "not slow"`` leaves them out, by pytest's own marker selection (the root conftest's collection hook)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT_CONFTEST = Path(__file__).parents[1] / "conftest.py"


@pytest.mark.parametrize(("args", "outcomes"), [
    ((), {"passed": 1, "skipped": 1}),
    (("-m", "slow"), {"passed": 1, "deselected": 1}),
    (("-m", "not slow"), {"passed": 1, "deselected": 1}),
    (("-m", "slow or not slow"), {"passed": 2}),
])
def test_slow_tests_follow_the_marker_expression(pytester, args, outcomes):
    pytester.makeconftest(ROOT_CONFTEST.read_text())
    pytester.makeini("[pytest]\nmarkers =\n    slow: long runs\n")
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.slow
        def test_slow():
            pass

        def test_fast():
            pass
        """
    )
    result = pytester.runpytest_inprocess(*args, "-rs")
    result.assert_outcomes(**outcomes)
    if not args:
        result.stdout.fnmatch_lines(["*slow: run with -m slow*"])
