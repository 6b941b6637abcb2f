"""Damage copies of valid inputs and check how spotflat reacts (the fuzz suite's tools).

Independent of the code under test: header cards are located and edited in the
raw bytes (offsets from astropy's reading of the *undamaged* file), tables are
rewritten with astropy, and the verdict on a run is taken from what a user
sees (exit code, standard error, the files on disk).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

CARD = 80


# --------------------------------------------------------------------------- byte-level damage

def hdu_offsets(path: Path) -> list[dict]:
    """``hdrLoc``/``datLoc``/``datSpan`` of every HDU of an undamaged file."""
    with fits.open(path) as hdul:
        return [hdul.fileinfo(i) for i in range(len(hdul))]


def set_card(path: Path, hdu: int, key: str, value: str | None = None, card: str | None = None) -> None:
    """Replace the value text of ``key`` in HDU ``hdu`` (or the whole 80-character card)."""
    info = hdu_offsets(path)[hdu]
    buf = bytearray(path.read_bytes())
    pos = info["hdrLoc"]
    while pos < info["datLoc"]:
        head = buf[pos:pos + 8].decode("ascii", "replace").rstrip()
        if head == key:
            new = card if card is not None else f"{key:<8}= {value:>20}"
            buf[pos:pos + CARD] = new.ljust(CARD)[:CARD].encode("latin-1")
            path.write_bytes(bytes(buf))
            return
        if head == "END":
            break
        pos += CARD
    raise KeyError(f"{key} not in HDU {hdu} of {path}")


def truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:max(1, int(len(data) * fraction))])


def flip_bytes(path: Path, rng: np.random.Generator, n: int = 8) -> None:
    buf = bytearray(path.read_bytes())
    for i in rng.integers(0, len(buf), n):
        buf[i] ^= int(rng.integers(1, 256))
    path.write_bytes(bytes(buf))


# --------------------------------------------------------------------------- table-level damage

def rewrite_table(path: Path, edit, hdu: int = 1) -> None:
    """Rewrite table HDU ``hdu`` after ``edit(table)`` (returns the new table); other HDUs kept."""
    with fits.open(path) as hdul:
        hdus = [h.copy() for h in hdul]
    t = Table(hdus[hdu].data)
    t = edit(t) or t
    new = fits.table_to_hdu(t)
    for k, v in hdus[hdu].header.items():
        if not re.match(r"^(XTENSION|BITPIX|NAXIS\d*|PCOUNT|GCOUNT|TFIELDS|T(TYPE|FORM|UNIT|DIM|NULL|SCAL|ZERO)\d+)$", k) \
                and k not in new.header and k not in ("COMMENT", "HISTORY", ""):
            new.header[k] = v
    hdus[hdu] = new
    fits.HDUList(hdus).writeto(path, overwrite=True)


# --------------------------------------------------------------------------- observing a run

def snapshot(*roots: Path) -> dict:
    """Every file (and link, and folder) under ``roots``: kind, size, mtime, content hash."""
    snap = {}
    for root in roots:
        root = Path(root)
        items = [root] if not root.is_dir() or root.is_symlink() else [root, *root.rglob("*")]
        for p in items:
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode):
                snap[str(p)] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                snap[str(p)] = ("dir",)
            elif stat.S_ISREG(st.st_mode):
                if st.st_mode & 0o444:
                    digest = hashlib.sha1(p.read_bytes()).hexdigest()
                else:
                    digest = "unreadable"
                snap[str(p)] = ("file", st.st_size, st.st_mtime_ns, digest, stat.S_IMODE(st.st_mode))
            else:
                snap[str(p)] = ("special", st.st_mode, st.st_rdev)
    return snap


@dataclass
class Outcome:
    """What a user saw."""

    code: int
    stdout: str
    stderr: str
    exception: BaseException | None = None
    problems: list = field(default_factory=list)


def run_cli(args, cwd: Path | None = None) -> Outcome:
    """Run ``spotflat`` in-process (click's runner), standard error apart."""
    import warnings

    from click.testing import CliRunner

    from spotflat.cli import main

    runner = CliRunner()
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = runner.invoke(main, [str(a) for a in args], catch_exceptions=True)
    finally:
        os.chdir(old)
    err = res.stderr
    # a warning escaping to Python's warning machinery would reach a user's terminal
    for w in caught:
        if issubclass(w.category, RuntimeWarning):
            err += f"\n{w.filename}:{w.lineno}: RuntimeWarning: {w.message}"
    exc = res.exception if res.exception is not None and not isinstance(res.exception, SystemExit) else None
    return Outcome(res.exit_code, res.stdout, err, exc)


def run_subprocess(args, cwd: Path | None = None, timeout: float = 120) -> Outcome:
    """Run ``spotflat`` as a user does (a new interpreter), for tracebacks and warnings."""
    src = Path(__file__).resolve().parents[1] / "src"
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("SPOTFLAT_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "spotflat.cli", *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return Outcome(p.returncode, p.stdout, p.stderr)


def error_problems(out: Outcome, names: list[str], codes=(1, 2)) -> list[str]:
    """What is wrong with a run that should have failed cleanly, naming one of ``names``."""
    bad = []
    if out.exception is not None:
        bad.append(f"crashed: {type(out.exception).__name__}: {out.exception}")
    if out.code not in codes:
        bad.append(f"exit code {out.code}, expected one of {codes}")
    err = out.stderr.strip()
    if "Traceback" in out.stderr or "Warning:" in out.stderr and "RuntimeWarning" in out.stderr:
        bad.append(f"traceback or RuntimeWarning on stderr: {err[-300:]!r}")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    msg = [ln for ln in lines if ln.startswith("Error")]
    if not msg:
        bad.append(f"no 'Error:' line on stderr: {err[-300:]!r}")
    else:
        m = msg[-1]
        if len(msg) > 1 or "\n" in m:
            bad.append(f"more than one error line: {msg}")
        if "unexpected error" in m:
            bad.append(f"reached the last resort: {m}")
        if names and not any(n in m for n in names):
            bad.append(f"message names none of {names}: {m}")
    return bad


def is_char_device(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def sim_flux_table(path: Path) -> np.ndarray:
    with fits.open(path) as h:
        return np.asarray(h["SPOTS"].data["flux"], float)
