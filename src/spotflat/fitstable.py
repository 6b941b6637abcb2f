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

import re
from pathlib import Path

import numpy as np

__all__ = ["Unsupported", "FitsFile", "read_fits"]

_BLOCK = 2880
_CARD = 80
_TFORM = re.compile(r"^\s*(\d*)([LXBIJKEDAM])")
_DTYPES = {"L": "i1", "B": "u1", "I": ">i2", "J": ">i4", "K": ">i8", "E": ">f4", "D": ">f8", "A": "S1"}
_WIDTH = {"L": 1, "B": 1, "I": 2, "J": 4, "K": 8, "E": 4, "D": 8, "A": 1, "M": 16}


class Unsupported(Exception):
    """The file uses a FITS feature this reader does not handle."""


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
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        return float(raw.replace("D", "E"))
    except ValueError:
        return raw


class _Header(dict):
    """Header keywords of one HDU, plus where its data starts.

    Values are kept as the card text and parsed on first access: a catalogue
    header has hundreds of cards and a reader needs a dozen of them.
    """

    data_start: int = 0
    data_size: int = 0

    def __getitem__(self, key):
        value = dict.__getitem__(self, key)
        if isinstance(value, _Raw):
            value = _value(value)
            dict.__setitem__(self, key, value)
        return value

    def get(self, key, default=None):
        return self[key] if key in self else default


class _Raw(str):
    """An unparsed header value."""


def _parse_header(buf: memoryview | bytes, start: int) -> _Header:
    hdr = _Header()
    pos = start
    n = len(buf)
    while True:
        if pos + _BLOCK > n:
            raise Unsupported("header runs past the end of the file (truncated?)")
        block = bytes(buf[pos:pos + _BLOCK]).decode("ascii", "replace")
        pos += _BLOCK
        for i in range(0, _BLOCK, _CARD):
            card = block[i:i + _CARD]
            key = card[:8].rstrip()
            if key == "END":
                hdr.data_start = pos
                naxis = hdr.get("NAXIS", 0)
                size = 0
                if naxis:
                    size = abs(hdr.get("BITPIX", 8)) // 8
                    for ax in range(1, naxis + 1):
                        size *= hdr.get(f"NAXIS{ax}", 0)
                    size = hdr.get("GCOUNT", 1) * (hdr.get("PCOUNT", 0) + size)
                hdr.data_size = size
                return hdr
            if key == "HIERARCH":
                body = card[9:]
                if "=" in body:
                    k, v = body.split("=", 1)
                    hdr[k.strip()] = _Raw(v)
            elif card[8:10] == "= " and key:
                hdr[key] = _Raw(card[10:])


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

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            self.buf = fh.read()
        if not self.buf.startswith(b"SIMPLE  ="):
            raise Unsupported("not a plain FITS file")
        self.headers: list[_Header] = []
        pos = 0
        while pos < len(self.buf):
            hdr = _parse_header(self.buf, pos)
            self.headers.append(hdr)
            end = hdr.data_start + hdr.data_size
            if end > len(self.buf):
                raise Unsupported(f"HDU {len(self.headers) - 1} data runs past the end of the file (truncated?)")
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
        h = self.headers[hdu]
        return [str(h.get(f"TTYPE{i}", "")).strip() for i in range(1, h.get("TFIELDS", 0) + 1)]

    def columns(self, hdu: int, names: list[str]) -> dict[str, np.ndarray]:
        """Read ``names`` from binary table ``hdu`` as native-endian arrays.

        Missing names are simply absent from the result.
        """
        h = self.headers[hdu]
        if h.get("XTENSION", "").strip() != "BINTABLE":
            raise Unsupported(f"HDU {hdu} is not a binary table")
        width, nrows = h["NAXIS1"], h["NAXIS2"]
        wanted = set(names)
        fields, offset = {}, 0
        for i in range(1, h.get("TFIELDS", 0) + 1):
            name = str(h.get(f"TTYPE{i}", "")).strip()
            m = _TFORM.match(str(h[f"TFORM{i}"]))
            if m is None:
                raise Unsupported(f"column format {h[f'TFORM{i}']!r}")
            repeat = int(m.group(1) or 1)
            code = m.group(2)
            nbytes = (repeat + 7) // 8 if code == "X" else repeat * _WIDTH[code]
            if name in wanted:
                if code in ("X", "M") or repeat != 1 or any(f"{k}{i}" in h for k in ("TSCAL", "TZERO")):
                    raise Unsupported(f"column {name!r} is not a plain scalar")
                fields[name] = (np.dtype(_DTYPES[code]), offset)
            offset += nbytes
        if offset != width:
            raise Unsupported("row width does not match the column formats")
        rec = np.dtype({"names": list(fields), "formats": [d for d, _ in fields.values()],
                        "offsets": [o for _, o in fields.values()], "itemsize": width})
        data = np.frombuffer(self.buf, dtype=rec, count=nrows, offset=h.data_start)
        return {name: data[name].astype(data[name].dtype.newbyteorder("="))
                for name in fields}


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
