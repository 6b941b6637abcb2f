"""Small file helpers shared by every reader and writer.

* :func:`staged_outputs` and :func:`atomic_path`: every file a command writes
  is written under a temporary name and all of them are renamed into place
  together once the last one is complete, so a failed run leaves nothing
  behind (no half-written file, no partial set of files).
* :func:`check_output`: the one check of an output path (not empty, not an
  input, a regular file or a new name in a writable folder).
* :func:`reading`: turns whatever a library raises on a damaged or unreadable
  file into an :class:`~spotflat.errors.InputError` naming the file.
* :func:`provenance_cards`, :func:`fits_safe` and :func:`fits_table_safe`:
  provenance that survives any path (FITS headers and string columns are
  ASCII; other characters are percent-encoded, losslessly).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import errno
import os
import stat as _stat
import tempfile
import urllib.parse
import warnings
from pathlib import Path
from typing import Iterable, Iterator

from .errors import InputError, SpotflatError

__all__ = ["atomic_path", "staged_outputs", "remove_with_outputs", "make_output_dir", "check_output_dir", "check_output", "check_writable",
           "check_readable", "reading", "provenance_cards", "fits_safe", "fits_unescape",
           "fits_table_safe", "fits_table_unescape", "STRENC"]

#: Header card (on a table HDU) saying its string columns are percent-encoded.
STRENC = "STRENC"
_STRENC_VALUE = "percent-encoded UTF-8"


# --------------------------------------------------------------------------- paths

def check_output(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (),
                 option: str | None = None) -> Path:
    """Fail early, with a clear message, when ``path`` must not be written.

    Refused: an empty name; one of ``inputs`` (also through a link); anything
    that exists and is not a regular file (a folder, a device node such as
    ``/dev/null``, a pipe, a socket); a dangling or looping symbolic link; a
    missing or read-only folder.

    Parameters
    ----------
    path : str or os.PathLike
        Output file that will be created or replaced.
    inputs : iterable of path-like
        Files the run reads (they must not be overwritten).
    option : str, optional
        The command-line option naming the path (for the message), e.g. ``-o``.

    Returns
    -------
    pathlib.Path
    """
    if os.fspath(path) == "":
        raise InputError(f"{option}: empty output path" if option else "empty output path",
                         expected="a file name")
    path = Path(path)
    if path.is_symlink() and not path.exists():
        try:
            os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InputError("output path is a symbolic link loop", path=path,
                                 expected="a regular file or a new name") from None
        raise InputError(f"output path is a dangling symbolic link (to {os.readlink(path)})", path=path,
                         expected="a regular file or a new name")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise InputError(f"cannot use output path ({exc.strerror})", path=path) from None
    if st is not None:
        if _stat.S_ISDIR(st.st_mode):
            raise InputError("output path is a directory", path=path, expected="a file name")
        if not _stat.S_ISREG(st.st_mode):
            raise InputError("output path exists and is not a regular file (a device, pipe or socket)",
                             path=path, expected="a regular file or a new name")
        # one stat per input against the output's (device, inode) -- what
        # os.path.samefile does, without stat-ing the output again for each of
        # thousands of inputs (a rerun over 1400 files did 2800 stats per output)
        ident = (st.st_dev, st.st_ino)
        for inp in inputs:
            try:
                other = os.stat(inp)
                same = (other.st_dev, other.st_ino) == ident
            except OSError:
                same = os.path.abspath(path) == os.path.abspath(inp)
            if same:
                raise InputError("output path is one of the input files", path=path,
                                 expected="a new name (the input would be overwritten)")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise InputError("not a directory", path=parent, expected="a folder for the output")
    if not parent.is_dir():
        raise InputError("output directory does not exist", path=parent)
    if not os.access(parent, os.W_OK):
        raise InputError("output directory is not writable", path=parent)
    return path


def check_writable(path: str | os.PathLike) -> Path:
    """:func:`check_output` without inputs (kept for callers of earlier versions)."""
    return check_output(path)


def check_readable(path: str | os.PathLike, what: str = "an input file") -> Path:
    """An input path that exists, is readable and is not a broken link.

    Raises
    ------
    InputError
        Naming the path: no such file, dangling symbolic link, symbolic link
        loop, permission denied.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _os_error(exc, path, what) from None
    if _stat.S_ISDIR(st.st_mode):
        return path
    if not _stat.S_ISREG(st.st_mode):  # reading a pipe or a device would hang or never end
        raise InputError("not a regular file (a device, pipe or socket)", path=path, expected=what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        os.close(fd)
    except OSError as exc:
        raise _os_error(exc, path, what) from None
    if not _unprivileged_readable(st):
        raise InputError("permission denied (mode 000: nobody may read it)", path=path,
                         expected=f"{what} readable by its owner (chmod u+r)")
    return path


def _unprivileged_readable(st: os.stat_result) -> bool:
    """False for a file that only root's override can read (no read bit at all).

    Running as root, ``os.access`` is always true; a file with no read bit for
    anybody is nevertheless a mistake the user wants to hear about, not data.
    """
    return bool(st.st_mode & (_stat.S_IRUSR | _stat.S_IRGRP | _stat.S_IROTH))


def _os_error(exc: OSError, path: Path, what: str = "an input file") -> InputError:
    """An ``InputError`` naming ``path`` for an ``OSError`` met reading it."""
    if exc.errno == errno.ELOOP:
        return InputError("symbolic link loop", path=path, expected=what)
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return InputError(f"dangling symbolic link (to {os.readlink(path)})", path=path, expected=what)
    if exc.errno == errno.ENOENT:
        return InputError("no such file or directory", path=path, expected=what)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return InputError("permission denied", path=path, expected=f"{what} you may read")
    if exc.errno == errno.EISDIR:
        return InputError("is a directory", path=path, expected=what)
    return InputError(f"cannot read ({exc.strerror or exc})", path=path, expected=what)


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str = "a FITS file") -> Iterator[None]:
    """Turn any failure while reading ``path`` into an :class:`InputError` naming it.

    ``InputError`` and other spotflat errors pass unchanged (a path is added
    when they name none); ``OSError`` says what the system said (permission
    denied, link loop, ...); astropy's ``VerifyError``, unparsable cards,
    ``MemoryError`` (a damaged header asking for a huge array) and the usual
    ``ValueError``/``TypeError``/``KeyError``/``IndexError``/``UnicodeError``
    become "damaged or unreadable".

    Examples
    --------
    >>> try:
    ...     with reading("x.fits"):
    ...         raise ValueError("Unparsable card (NAXIS1)")
    ... except InputError as exc:
    ...     print(exc)
    x.fits: damaged or unreadable (ValueError: Unparsable card (NAXIS1)) (expected a FITS file)
    """
    path = Path(path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            except Exception:
                if any(_truncation(w) for w in caught):
                    raise InputError("truncated FITS file", path=path, expected=what) from None
                raise
        for w in caught:
            if _truncation(w):
                raise InputError(f"truncated FITS file ({w.message})", path=path, expected=what)
        for w in caught:  # the others go on to the caller
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    except InputError as exc:
        if exc.path is None:
            raise InputError(exc.problem, path=path, expected=exc.expected) from None
        raise
    except SpotflatError:
        raise
    except OSError as exc:
        if exc.errno is None:  # astropy raises bare OSError for "Empty or corrupt FITS file"
            raise InputError(f"damaged or unreadable ({exc})", path=path, expected=what) from None
        raise _os_error(exc, Path(exc.filename) if exc.filename else path, what) from None
    except MemoryError:
        raise InputError("damaged header: it asks for more memory than the machine has", path=path,
                         expected=what) from None
    except (ValueError, TypeError, KeyError, IndexError, UnicodeError, AttributeError, EOFError,
            OverflowError, ZeroDivisionError, AssertionError, NotImplementedError) as exc:
        text = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise InputError(f"damaged or unreadable ({type(exc).__name__}: {text})", path=path,
                         expected=what) from None
    except Exception as exc:  # astropy's VerifyError derives from Exception only
        if type(exc).__name__ == "VerifyError" or "zlib" in type(exc).__module__:
            text = " ".join(str(exc).split())[:200]
            raise InputError(f"damaged FITS header ({text})", path=path, expected=what) from None
        raise


def _truncation(w: warnings.WarningMessage) -> bool:
    return "truncated" in str(w.message).lower()


def check_output_dir(path: str | os.PathLike, option: str | None = None) -> Path:
    """Check, without creating anything, that ``path`` can be an output folder.

    Commands call it before any work, so a bad ``-o`` fails in a second, not
    after the computation; :func:`make_output_dir` creates it later.
    """
    if os.fspath(path) == "":
        raise InputError(f"{option}: empty output path" if option else "empty output path",
                         expected="a folder name")
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise InputError("output folder is a dangling symbolic link", path=path, expected="a folder or a new name")
    if path.exists():
        if not path.is_dir():
            raise InputError("output path exists and is not a directory", path=path, expected="an output folder")
        if not os.access(path, os.W_OK):
            raise InputError("output directory is not writable", path=path)
        return path
    p = path.absolute()
    while not p.exists():
        if p.is_symlink():
            raise InputError("output folder is a dangling symbolic link", path=p)
        p = p.parent
    if not p.is_dir():
        raise InputError("not a directory", path=p, expected="a folder for the outputs")
    if not os.access(p, os.W_OK):
        raise InputError("output directory is not writable", path=p)
    return path


# --------------------------------------------------------------------------- staging

class _Stage:
    """The outputs of one command: temporary files waiting to be renamed together."""

    def __init__(self, inputs: Iterable[str | os.PathLike]) -> None:
        self.pending: list[tuple[Path, Path]] = []  # (temporary, final)
        self.created: list[Path] = []  # folders made for the outputs (removed on failure)
        self.inputs: list[Path] = [Path(p) for p in inputs]
        self.removals: list[Path] = []  # stale outputs of an earlier run, removed once the set is in place

    def commit(self) -> None:
        """Rename every temporary file into place; on any failure undo all of them."""
        for _, final in self.pending:  # what appeared since the checks: refuse before renaming anything
            if os.path.lexists(final) and not final.is_file():
                raise InputError("output path appeared during the run and is not a regular file", path=final,
                                 expected="a regular file or a new name")
        done: list[tuple[Path, Path | None]] = []  # (final, backup of the file it replaced)
        try:
            for tmp, final in self.pending:
                backup = None
                if os.path.lexists(final):
                    backup = final.with_name(f".{final.name}.{os.getpid()}.bak")
                    os.replace(final, backup)
                done.append((final, backup))
                os.replace(tmp, final)
        except BaseException:
            for final, backup in reversed(done):
                with contextlib.suppress(OSError):
                    if backup is not None:
                        os.replace(backup, final)
                    elif final.exists():
                        final.unlink()
            raise
        for _, backup in done:
            if backup is not None:
                with contextlib.suppress(OSError):
                    backup.unlink()
        for stale in self.removals:
            with contextlib.suppress(OSError):
                stale.unlink()
        self.pending = []
        self.removals = []

    def discard(self) -> None:
        for tmp, _ in self.pending:
            with contextlib.suppress(OSError):
                tmp.unlink()
        for folder in reversed(self.created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty
        self.pending = []
        self.removals = []


_STAGE: contextvars.ContextVar[_Stage | None] = contextvars.ContextVar("spotflat_stage", default=None)


@contextlib.contextmanager
def staged_outputs(inputs: Iterable[str | os.PathLike] = ()) -> Iterator[_Stage]:
    """Write a set of outputs that appear together or not at all.

    Inside the block, :func:`atomic_path` writes to temporary files next to
    their destinations; when the block ends without error they are all renamed
    into place (an existing file is kept aside until every rename has
    succeeded, then removed); when it raises, the temporary files and the
    folders :func:`make_output_dir` created are removed. Nested blocks join
    the outermost one. Files named by ``inputs`` are never overwritten.

    Parameters
    ----------
    inputs : iterable of path-like
        Input files of the run, protected from being written over.

    Examples
    --------
    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> try:
    ...     with staged_outputs():
    ...         with atomic_path(os.path.join(d, "a.txt")) as tmp:
    ...             _ = tmp.write_text("a")
    ...         raise RuntimeError("the second output failed")
    ... except RuntimeError:
    ...     pass
    >>> os.listdir(d)
    []
    """
    outer = _STAGE.get()
    if outer is not None:
        outer.inputs.extend(Path(p) for p in inputs)
        yield outer
        return
    stage = _Stage(inputs)
    token = _STAGE.set(stage)
    try:
        yield stage
        _STAGE.reset(token)
        token = None
        stage.commit()
    except BaseException:
        stage.discard()
        raise
    finally:
        if token is not None:
            _STAGE.reset(token)


def remove_with_outputs(path: str | os.PathLike) -> None:
    """Remove ``path`` (a stale output of an earlier run) when the current output set is in place.

    Inside :func:`staged_outputs` the file is removed only after every output
    has been renamed into place, and kept if the set fails; outside, at once.
    """
    stage = _STAGE.get()
    if stage is None:
        Path(path).unlink(missing_ok=True)
    else:
        stage.removals.append(Path(path))


def make_output_dir(path: str | os.PathLike, option: str | None = None) -> Path:
    """Create the output folder ``path`` (and parents) if needed.

    Inside :func:`staged_outputs`, folders created here are removed again when
    the run fails. An existing non-folder at ``path`` is refused.
    """
    path = check_output_dir(path, option)
    if path.is_dir():
        return path
    missing = []
    p = path.absolute()
    while not p.exists():
        missing.append(p)
        p = p.parent
    try:
        path.mkdir(parents=True)
    except OSError as exc:
        raise InputError(f"cannot create output directory ({exc.strerror})", path=path) from None
    stage = _STAGE.get()
    if stage is not None:
        stage.created.extend(reversed(missing))
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it into place on success.

    Nothing is left behind when the body raises, so a failed run never leaves a
    partial output file. Inside :func:`staged_outputs` the rename waits for the
    end of the whole set.

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
    stage = _STAGE.get()
    path = check_output(path, inputs=stage.inputs if stage is not None else ())
    if path.exists() and not overwrite:
        raise InputError("output file exists", path=path, expected="a new file or overwrite=True")
    if stage is not None and any(_same_path(path, final) for _, final in stage.pending):
        raise InputError("two outputs of one run have the same name", path=path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes),
                               dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    os.unlink(tmp)  # writers (astropy, numpy) want to create the file themselves
    tmp = Path(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise InputError("the writer produced no file", path=path)
        if stage is None:
            os.replace(tmp, path)
        else:
            stage.pending.append((tmp, path))
            tmp = None
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


def _same_path(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


# --------------------------------------------------------------------------- provenance

_SAFE = "".join(chr(c) for c in range(32, 127) if chr(c) != "%")  # printable ASCII but the escape


def fits_safe(value: object) -> object:
    """A header/column value FITS can hold: printable ASCII, others percent-encoded.

    Non-string values are returned unchanged; a string with only printable
    ASCII (and no ``%``) is returned unchanged, so ordinary paths stay readable.

    Examples
    --------
    >>> fits_safe("/data/données/a.fits")
    '/data/donn%C3%A9es/a.fits'
    >>> fits_unescape(fits_safe("/data/données/a.fits"))
    '/data/données/a.fits'
    """
    if not isinstance(value, str):
        return value
    # for ASCII, isprintable() is exactly the codes 32..126
    if value.isascii() and value.isprintable() and "%" not in value:
        return value
    return urllib.parse.quote(value, safe=_SAFE)


def fits_unescape(value: object) -> object:
    """Undo :func:`fits_safe`."""
    return urllib.parse.unquote(value) if isinstance(value, str) and "%" in value else value


def fits_table_safe(table):
    """A copy of an astropy ``Table`` whose string columns FITS can hold.

    String columns come back as ASCII bytes (``S``) of the column's width
    (wider only if encoding lengthened a value): what FITS stores, so
    astropy writes them without encoding every row again. When any value
    had to be encoded, ``table.meta[STRENC]`` says so, and
    :func:`fits_table_unescape` restores the values on reading.
    """
    import numpy as np

    out = table.copy(copy_data=False)
    encoded = False
    for name in out.colnames:
        col = out[name]
        if col.dtype.kind == "U" and col.ndim == 1:
            # each distinct value once (a long table repeats a few names): a dict, not a sort of the strings
            codes: dict = {}
            inverse = np.fromiter((codes.setdefault(v, len(codes)) for v in np.asarray(col).tolist()),
                                  dtype=np.intp, count=len(col))
            values = list(codes)
            safe = [fits_safe(v) for v in values]
            width = col.dtype.itemsize // 4
            if safe != values:
                encoded = True
                width = max([len(v) for v in safe] + [1])
            # as ASCII bytes of the column's width: what FITS stores (astropy would encode
            # every row again); the file is the same
            out[name] = np.array([v.encode("ascii") for v in safe], dtype=f"S{width}")[inverse]
    if encoded:
        out.meta = dict(out.meta)
        out.meta[STRENC] = _STRENC_VALUE
    return out


def fits_table_unescape(table, header=None):
    """Restore the string columns of a table written through :func:`fits_table_safe`."""
    import numpy as np

    meta = header if header is not None else table.meta
    if STRENC not in meta:
        return table
    for name in table.colnames:
        col = table[name]
        if col.dtype.kind in "US" and col.ndim == 1:
            table[name] = np.array([fits_unescape(v.decode() if isinstance(v, bytes) else str(v))
                                    for v in col], dtype=str)
    table.meta.pop(STRENC, None)
    return table


def provenance_cards(**extra: object) -> dict[str, object]:
    """Header cards every spotflat output carries.

    Parameters
    ----------
    **extra
        Further keyword/value pairs (keys are upper-cased, at most 8 characters
        are kept for FITS compatibility by the caller). Strings with
        characters FITS headers cannot hold (a path with ``é``) are
        percent-encoded (:func:`fits_safe`).

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
    cards.update({k.upper(): fits_safe(v) for k, v in extra.items()})
    return cards
