"""Small file helpers shared by every writer: atomic writes and provenance."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import InputError

__all__ = ["atomic_path", "provenance_cards", "check_writable"]


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early, with a clear message, when ``path`` cannot be written.

    Parameters
    ----------
    path : str or os.PathLike
        Output file that will be created or replaced.

    Returns
    -------
    pathlib.Path
        The path, resolved against the working directory.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise InputError("not a directory", path=parent, expected="a folder for the output")
    if not parent.is_dir():
        raise InputError("output directory does not exist", path=parent)
    if not os.access(parent, os.W_OK):
        raise InputError("output directory is not writable", path=parent)
    if path.is_dir():
        raise InputError("output path is a directory", path=path, expected="a file name")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it into place on success.

    Nothing is left behind when the body raises, so a failed run never leaves a
    partial output file.

    Parameters
    ----------
    path : str or os.PathLike
        Final destination.
    overwrite : bool
        Replace an existing file (default) or refuse.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> with atomic_path(os.path.join(d, "a.npy")) as tmp:
    ...     np.save(tmp, np.arange(3))
    >>> sorted(os.listdir(d))
    ['a.npy']
    """
    path = check_writable(path)
    if path.exists() and not overwrite:
        raise InputError("output file exists", path=path, expected="a new file or overwrite=True")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes),
                               dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    os.unlink(tmp)  # writers (astropy, numpy) want to create the file themselves
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def provenance_cards(**extra: object) -> dict[str, object]:
    """Header cards every spotflat output carries.

    Parameters
    ----------
    **extra
        Further keyword/value pairs (keys are upper-cased, at most 8 characters
        are kept for FITS compatibility by the caller).

    Returns
    -------
    dict
        ``CREATOR``, ``SFVERS`` (package version), ``DATE`` (UTC, ISO) and the
        extra items.
    """
    from . import __version__

    cards: dict[str, object] = {
        "CREATOR": "spotflat",
        "SFVERS": __version__,
        "DATE": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
    }
    cards.update({k.upper(): v for k, v in extra.items()})
    return cards
