"""A fast, strict reader of columns from uncompressed FITS binary tables.

Processed-grid runs hold thousands of small catalogues; opening each with
``astropy.io.fits`` costs several milliseconds of header parsing, which
dominates ``spotflat calibrate``. This module reads the headers card by card
and maps only the wanted columns straight from the file bytes with numpy.

It handles what processed-grid files contain: uncompressed files, binary
tables with fixed-width columns (``L X B I J K E D A``, repeat counts) and no
``TSCAL``/``TZERO``/``TNULL`` scaling on the columns read. Anything else
raises :class:`Unsupported`, and callers fall back to astropy.
"""

from __future__ import annotations

import errno
import gzip
import os
import re
import stat
import zlib
from pathlib import Path

import numpy as np

from .errors import InputError

__all__ = ["Unsupported", "Damaged", "FitsFile", "read_fits", "check_structure"]

_BLOCK = 2880
_CARD = 80
_INT = re.compile(r"[-+]?\d+")
_CONTINUE = re.compile(r"CONTINUE  '")
_TFORM = re.compile(r"^\s*(\d*)([LXBIJKEDAM])")
_DTYPES = {"L": "i1", "B": "u1", "I": ">i2", "J": ">i4", "K": ">i8", "E": ">f4", "D": ">f8", "A": "S1"}
_WIDTH = {"L": 1, "B": 1, "I": 2, "J": 4, "K": 8, "E": 4, "D": 8, "A": 1, "M": 16}


# column layouts already parsed, by their header cards (see FitsFile._layout)
_LAYOUTS: dict = {}
_COLUMN_KEYS = frozenset(("TTYPE", "TFORM", "TSCAL", "TZERO"))


class Unsupported(Exception):
    """The file uses a FITS feature this reader does not handle."""


class Damaged(Exception):
    """The file breaks the FITS standard in a way no reader can get around.

    :class:`FitsFile` turns it into an :class:`~spotflat.errors.InputError`
    naming the file: astropy would fail on it too (or, for sizes, try to
    allocate what a damaged header asks for).
    """


def _value(raw: str):
    """Parse the value part of a header card (string, logical, int, float)."""
    raw = raw.strip()
    if raw.startswith("'"):
        end = raw.find("'", 1)
        while end != -1 and raw[end + 1:end + 2] == "'":  # doubled quote inside a string
            end = raw.find("'", end + 2)
        return raw[1:end].replace("''", "'").rstrip()
    raw = raw.split("/", 1)[0].strip()
    if raw in ("T", "F"):
        return raw == "T"
    if _INT.fullmatch(raw):  # test first: a failed int() costs an exception per float card
        return int(raw)
    try:
        return float(raw.replace("D", "E"))
    except ValueError:
        return raw


class _Header(dict):
    """Header keywords of one HDU, plus where its data starts.

    The dict holds each card's raw value text; indexing parses it on first
    access (a catalogue header has hundreds of cards and a reader needs a
    dozen of them).
    """

    data_start: int = 0
    data_size: int = 0
    layout: tuple | None = None  # a binary table's column layout, once parsed

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._parsed: dict = {}

    def __getitem__(self, key):
        try:
            return self._parsed[key]
        except KeyError:
            value = self._parsed[key] = _value(dict.__getitem__(self, key))
            return value

    def get(self, key, default=None):
        return self[key] if key in self else default

    def raw(self, key: str) -> str | None:
        """The unparsed value text of ``key`` (None when absent)."""
        return dict.get(self, key)


# One 80-character card: ``KEY     = value`` (key left-justified in columns 1-8,
# "= " in 9-10) gives (key, value text); any other card gives ("", "").
# findall over a whole header runs at C speed: no Python loop over cards.
_CARDS = re.compile(r"(?s)(?=.{8}= )(\S{1,8}) *= (.{70})|.{80}")


def _join_continued(hdr: _Header, text: str) -> None:
    """Long string values: ``KEY = 'part&'`` then ``CONTINUE  'rest'`` cards.

    Only the cards around each ``CONTINUE`` are looked at: DM catalogues have
    a few long ``TDOC`` strings among hundreds of cards.
    """
    for m in _CONTINUE.finditer(text):
        c = m.start()
        # the keyword card just before a run of CONTINUE cards (a CONTINUE card
        # before this one has no "= " and is skipped here)
        head = text[c - _CARD:c] if c % _CARD == 0 else ""
        key = head[:8].rstrip()
        if head[8:10] != "= " or key not in hdr:
            continue
        parts = [_value(head[10:])]
        while text.startswith("CONTINUE  '", c) and isinstance(parts[-1], str) and parts[-1].endswith("&"):
            parts.append(_value(text[c + 10:c + _CARD]))
            c += _CARD
        if len(parts) > 1 and all(isinstance(p, str) for p in parts):
            joined = "".join(p[:-1] for p in parts[:-1]) + parts[-1]
            dict.__setitem__(hdr, key, "'" + joined.replace("'", "''") + "'")
            hdr._parsed.pop(key, None)


def _parse_header(buf: memoryview | bytes, start: int) -> _Header:
    n = len(buf)
    pos = start
    while True:  # the END card: "END" in columns 1-8 of a card
        i = buf.find(b"END", pos)
        if i < 0:
            raise Unsupported("header runs past the end of the file (truncated?)")
        if (i - start) % _CARD == 0 and buf[i + 3:i + 8] == b"     ":
            break
        pos = i + 1
    data_start = start + ((i - start) // _BLOCK + 1) * _BLOCK
    if data_start > n:
        raise Unsupported("header runs past the end of the file (truncated?)")
    text = bytes(buf[start:i]).decode("latin-1")
    hdr = _Header(_CARDS.findall(text))
    hdr.pop("", None)
    if "CONTINUE  '" in text:
        _join_continued(hdr, text)
    if "HIERARCH " in text:  # rare in these files: a Python loop is fine
        for c in range(0, len(text), _CARD):
            if text.startswith("HIERARCH ", c) and "=" in text[c + 9:c + _CARD]:
                k, v = text[c + 9:c + _CARD].split("=", 1)
                dict.__setitem__(hdr, k.strip(), v)
    hdr.data_start = data_start
    hdr.data_size = _data_size(hdr)
    return hdr


_BITPIX = (8, 16, 32, 64, -32, -64)


def _card_int(hdr: _Header, key: str, default=None, low: int = 0, high: int | None = None) -> int:
    """A structural integer card, checked: damaged headers fail here, before any allocation."""
    if key not in hdr:
        if default is None:
            raise Damaged(f"header lacks the {key} card")
        return default
    value = hdr[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise Damaged(f"header card {key} = {hdr.raw(key).split('/')[0].strip()!r} is not an integer")
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise Damaged(f"header card {key} = {value} is out of range (expected {bound})")
    return value


def _data_size(hdr: _Header) -> int:
    """Bytes of the HDU's data, from validated BITPIX/NAXISn/PCOUNT/GCOUNT cards."""
    naxis = _card_int(hdr, "NAXIS", high=999)
    bitpix = _card_int(hdr, "BITPIX", low=-64, high=64)
    if bitpix not in _BITPIX:
        raise Damaged(f"header card BITPIX = {bitpix} is not a FITS pixel type (expected one of 8 16 32 64 -32 -64)")
    if not naxis:
        return 0
    size = abs(bitpix) // 8
    for ax in range(1, naxis + 1):
        size *= _card_int(hdr, f"NAXIS{ax}")
    return _card_int(hdr, "GCOUNT", 1, low=1 if size else 0) * (_card_int(hdr, "PCOUNT", 0) + size)


def _read_bytes(path: Path) -> bytes:
    """The whole file, in four system calls (``open().read()`` makes nine)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a pipe must not block the open
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError("not a regular file (a device, pipe or socket)", path=path,
                             expected="a FITS file")
        if not st.st_mode & 0o444:  # root may read it, but a mode-000 file is not meant to be read
            raise PermissionError(errno.EACCES, "permission denied (mode 000)", str(path))
        size = st.st_size
        parts = [os.read(fd, size)]
        while len(parts[-1]) and sum(map(len, parts)) < size:  # short reads: pipes, network files
            parts.append(os.read(fd, size))
    finally:
        os.close(fd)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class FitsFile:
    """The HDU headers of a FITS file, with column access to binary tables.

    Parameters
    ----------
    path : str or pathlib.Path
        An uncompressed FITS file.

    Raises
    ------
    Unsupported
        For compressed or truncated files.
    """

    def __init__(self, path: str | Path, data: bytes | None = None) -> None:
        self.path = Path(path)
        try:
            self._open(data)
        except Damaged as exc:
            raise InputError(f"damaged FITS file: {exc}", path=self.path,
                             expected="a FITS file as written (not edited or truncated)") from None

    def _open(self, data: bytes | None) -> None:
        self.buf = _read_bytes(self.path) if data is None else data
        if self.buf[:2] == b"\x1f\x8b":
            # gzip: decompress here, so that the sizes the header asks for are checked
            # against the real data before astropy (or anyone) allocates them
            try:
                self.buf = gzip.decompress(self.buf)
            except (OSError, EOFError, zlib.error) as exc:
                raise Damaged(f"corrupt or truncated gzip stream ({exc})") from None
        if not self.buf.startswith(b"SIMPLE  ="):
            raise Unsupported("not a plain FITS file")
        if len(self.buf) % _BLOCK:
            raise Unsupported("file size is not a whole number of 2880-byte blocks (truncated?)")
        self.headers: list[_Header] = []
        pos = 0
        while pos < len(self.buf):
            hdr = _parse_header(self.buf, pos)
            self.headers.append(hdr)
            end = hdr.data_start + hdr.data_size
            if end > len(self.buf):
                raise Damaged(f"HDU {len(self.headers) - 1} needs {end} bytes, the file has {len(self.buf)} "
                              "(truncated, or a damaged NAXISn card)")
            pos = hdr.data_start + -(-hdr.data_size // _BLOCK) * _BLOCK
            if len(self.buf) - pos < _BLOCK:
                break

    def index(self, extname: str) -> int | None:
        """HDU number of ``EXTNAME``, or None."""
        for i, h in enumerate(self.headers):
            if str(h.get("EXTNAME", "")).strip().upper() == extname.upper():
                return i
        return None

    def colnames(self, hdu: int) -> list[str]:
        """Column names of binary table ``hdu``."""
        return list(self._layout(hdu)[0])

    def _layout(self, hdu: int) -> tuple[dict, int]:
        """``({name: (code, repeat, offset, scaled)}, row width)`` of table ``hdu``.

        Cached by the raw column cards: the files of one run share a layout,
        and parsing it costs more than reading the columns.
        """
        h = self.headers[hdu]
        if str(h.get("XTENSION", "")).strip() != "BINTABLE":
            raise Unsupported(f"HDU {hdu} is not a binary table")
        if h.layout is not None:
            return h.layout
        try:
            nfield = _card_int(h, "TFIELDS", high=999)
            _card_int(h, "NAXIS1")
            _card_int(h, "NAXIS2")
        except Damaged as exc:
            raise InputError(f"damaged FITS table (HDU {hdu}): {exc}", path=self.path) from None
        key = (h.raw("NAXIS1"), nfield, tuple(kv for kv in dict.items(h) if kv[0][:5] in _COLUMN_KEYS))
        hit = _LAYOUTS.get(key)
        if hit is not None:
            h.layout = hit
            return hit
        fields, offset = {}, 0
        for i in range(1, nfield + 1):
            name = str(h.get(f"TTYPE{i}", "")).strip()
            m = _TFORM.match(str(h.get(f"TFORM{i}", "")))
            if m is None:
                raise Unsupported(f"column format {h.get(f'TFORM{i}')!r}")
            repeat = int(m.group(1) or 1)
            code = m.group(2)
            scaled = any(f"{k}{i}" in h for k in ("TSCAL", "TZERO"))
            fields[name] = (code, repeat, offset, scaled)
            offset += (repeat + 7) // 8 if code == "X" else repeat * _WIDTH[code]
        if offset != h["NAXIS1"]:
            raise InputError(f"damaged FITS table (HDU {hdu}): the TFORMn cards make rows of {offset} bytes, "
                             f"NAXIS1 says {h['NAXIS1']}", path=self.path,
                             expected="consistent NAXIS1 and TFORMn cards")
        if len(_LAYOUTS) > 64:
            _LAYOUTS.clear()
        _LAYOUTS[key] = h.layout = (fields, offset)
        return h.layout

    def columns(self, hdu: int, names: list[str]) -> dict[str, np.ndarray]:
        """Read ``names`` from binary table ``hdu`` as native-endian arrays.

        Missing names are simply absent from the result.
        """
        layout, width = self._layout(hdu)
        h = self.headers[hdu]
        nrows = h["NAXIS2"]
        fields = {}
        for name in names:
            if name not in layout:
                continue
            code, repeat, offset, scaled = layout[name]
            if code in ("X", "M") or repeat != 1 or scaled:
                raise Unsupported(f"column {name!r} is not a plain scalar")
            fields[name] = (_DTYPES[code], offset)
        rec = np.dtype({"names": list(fields), "formats": [d for d, _ in fields.values()],
                        "offsets": [o for _, o in fields.values()], "itemsize": width})
        data = np.frombuffer(self.buf, dtype=rec, count=nrows, offset=h.data_start)
        out = {}
        for name in fields:
            if layout[name][0] == "L":  # FITS logicals are the bytes 'T' / 'F'
                out[name] = data[name] == ord("T")
            else:
                out[name] = data[name].astype(data[name].dtype.newbyteorder("="))
        return out


def check_structure(data: bytes, path: str | Path) -> None:
    """Check the structural cards of FITS bytes against their length, before astropy reads them.

    Raises
    ------
    InputError
        For damaged or truncated structure (a header asking for more data
        than there is), naming ``path``. Features this module does not read
        (compression, odd padding) are left to astropy.
    """
    try:
        FitsFile(path, data)
    except Unsupported:
        pass


def read_fits(path: str | Path) -> FitsFile:
    """Open ``path`` with the fast reader.

    Parameters
    ----------
    path : str or pathlib.Path
        An uncompressed FITS file.

    Returns
    -------
    FitsFile

    Raises
    ------
    Unsupported
        When the file needs a feature this reader lacks (use astropy then).
    """
    return FitsFile(path)
