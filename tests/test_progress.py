"""The library's progress bar: honest ETA, nothing at all when not on a terminal."""

from __future__ import annotations

import io

from spotflat import progress
from spotflat.progress import _Bar, progress_bar, progress_iter


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_eta_ignores_a_slow_first_step():
    """simulate: 3 s of setup before the first file, then 0.02 s per file (the 00:01:04 bug)."""
    clock, out = FakeClock(), io.StringIO()
    bar = _Bar(202, "Writing simulated run", out, clock=clock)
    clock.t = 3.0
    bar.update(1)
    assert bar.eta() is None  # one timed step is not a rate
    for _ in range(10):
        clock.t += 0.02
        bar.update(1)
    eta = bar.eta()
    assert eta is not None and abs(eta - 0.02 * (202 - 11)) < 0.05
    assert "ETA 00:04" in bar.line()


def test_bar_finishes_with_the_elapsed_time():
    clock, out = FakeClock(), io.StringIO()
    bar = _Bar(3, "Counting", out, clock=clock)
    for _ in range(3):
        clock.t += 30
        bar.update(1)
    bar.close()
    assert "3/3" in out.getvalue() and "done in 01:30" in out.getvalue()
    assert out.getvalue().endswith("\n")


def test_nothing_written_when_stderr_is_not_a_terminal(capsys):
    with progress_bar(5, "Reading grid files") as advance:
        for _ in range(5):
            advance(1)
    with progress_iter(range(4), "Reading grid files") as items:
        assert sum(items) == 6
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_bar_drawn_on_a_terminal(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    err = Tty()
    monkeypatch.setattr(progress.sys, "stderr", err)
    with progress_iter(list(range(4)), "Reading grid files") as items:
        assert list(items) == [0, 1, 2, 3]
    text = err.getvalue()
    assert "Reading grid files" in text and "4/4" in text and text.endswith("\n")
