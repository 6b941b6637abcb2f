"""Exceptions raised by spotflat.

Every error that a user can cause with bad input derives from
:class:`SpotflatError`, so the command line can turn it into a one-line
message and a non-zero exit code instead of a traceback.
"""

from __future__ import annotations

import os

__all__ = ["SpotflatError", "InputError"]


class SpotflatError(Exception):
    """Base class of all errors spotflat raises on bad input or data."""


class InputError(SpotflatError, ValueError):
    """A file or argument is not what spotflat expected.

    Parameters
    ----------
    problem : str
        What is wrong, in a few words.
    path : str or os.PathLike, optional
        The offending file, named first in the message when given.
    expected : str, optional
        What was expected instead.

    Examples
    --------
    >>> str(InputError("no column 'FLUX'", path="a.fits", expected="a legacy grid table"))
    "a.fits: no column 'FLUX' (expected a legacy grid table)"
    """

    def __init__(self, problem: str, path: str | os.PathLike | None = None,
                 expected: str | None = None) -> None:
        self.problem = problem
        self.path = None if path is None else os.fspath(path)
        self.expected = expected
        msg = problem if self.path is None else f"{self.path}: {problem}"
        if expected:
            msg += f" (expected {expected})"
        super().__init__(msg)
