"""The quality-control figure of a calibration: which exposures were used, and why not."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

__all__ = ["plot_qc", "write_qc_figure", "FigureProcess"]


def plot_qc(qc, detector: str = "", fig=None):
    """Four panels from a QC table (:attr:`spotflat.calibration.Calibration.qc`).

    Per-exposure robust scatter of t and pattern correlation, rejected
    fractions, and the grid centres on the CCD outline; used exposures in
    blue, excluded ones as red crosses with their file names.

    Parameters
    ----------
    qc : astropy.table.Table
    detector : str
        Detector name, for the CCD outline (a 4096 x 4004 box when unknown).
    fig : matplotlib.figure.Figure, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = fig or Figure(figsize=(11, 8))
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.07, top=0.9, wspace=0.28, hspace=0.35)  # (constrained layout costs 0.2 s)
    used = np.asarray(qc["used"], dtype=bool)
    j = np.arange(len(qc))
    names = [str(n) for n in qc["filename"]]
    ax = fig.subplots(2, 2)

    def mark(a, yv):
        a.plot(j[used], yv[used], "o", color="C0", label="used")
        a.plot(j[~used], yv[~used], "x", color="C3", ms=9, mew=2, label="excluded")
        for k in j[~used]:
            a.annotate(names[k], (k, yv[k]), fontsize=6, color="C3", rotation=30,
                       xytext=(3, 3), textcoords="offset points")
        a.set_xlabel("exposure")

    def log_axis(a):
        # plain-text tick labels ("0.1", "1"): the default 10^n labels go through
        # mathtext, whose parser costs ~0.3 s on the first figure of a process
        a.set_yscale("log")
        a.yaxis.set_major_formatter(_plain_log()())
        a.yaxis.set_minor_formatter(_plain_log()(labelOnlyBase=False, minor_thresholds=(1, 0.4)))

    sc = np.asarray(qc["t_scatter"], float) * 100
    mark(ax[0, 0], sc)
    if "t_width" in qc.colnames:
        w = np.asarray(qc["t_width"], float) * 100
        ax[0, 0].plot(j, w, "s", mfc="none", color="0.4", ms=5, label="10-90 % width")
    log_axis(ax[0, 0])
    ax[0, 0].set_ylabel("robust scatter of t (%)")
    ax[0, 0].legend(fontsize=7)
    r = np.asarray(qc["pattern_r"], float)
    mark(ax[0, 1], 1 - r)
    log_axis(ax[0, 1])
    ax[0, 1].set_ylabel("1 - correlation with consensus F")
    mark(ax[1, 0], np.asarray(qc["rejected_fraction"], float))
    ax[1, 0].set_ylabel("fraction of points rejected")
    a = ax[1, 1]
    ox, oy = _outline(detector)
    a.plot(ox, oy, "k-", lw=1)
    xc, yc = np.asarray(qc["x_centre"], float), np.asarray(qc["y_centre"], float)
    a.plot(xc[used], yc[used], "o", color="C0")
    a.plot(xc[~used], yc[~used], "x", color="C3", ms=9, mew=2)
    a.set_aspect("equal")
    a.set_xlabel("grid centre x (CCD pix)")
    a.set_ylabel("grid centre y (CCD pix)")
    fig.suptitle(f"Quality control {detector}: {int(used.sum())}/{len(qc)} exposures used")
    return fig


@functools.cache
def _plain_log():
    """A log-axis formatter class (built on first use: matplotlib is imported late)."""
    from matplotlib.ticker import LogFormatter

    class PlainLog(LogFormatter):
        """Log-axis labels as plain numbers, "0.02", "1", "3e-05" (no mathtext)."""

        def _num_to_string(self, x, vmin, vmax):
            return f"{x:.3g}"

    return PlainLog


def _outline(detector: str):
    nx, ny = 4096, 4004  # unknown detector: an E2V-sized box
    try:
        from .geometry import ccd_shape

        ny, nx = ccd_shape(detector)
    except Exception:
        pass
    return (np.array([-0.5, nx - 0.5, nx - 0.5, -0.5, -0.5]),
            np.array([-0.5, -0.5, ny - 0.5, ny - 0.5, -0.5]))


def write_qc_figure(qc, path: str | os.PathLike, detector: str = "", helper: "FigureProcess | None" = None,
                    png: bytes | None = None) -> Path:
    """Render :func:`plot_qc` to ``path`` (PNG), atomically.

    ``helper``: a :class:`FigureProcess` to draw in (this process draws when
    it cannot); ``png``: the figure already drawn (:meth:`FigureProcess.collect`).
    """
    from .fileio import atomic_path

    path = Path(path)
    if png is None and helper is not None:
        png = helper.draw(qc, detector)
    with atomic_path(path) as tmp:
        if png is not None:
            Path(tmp).write_bytes(png)
        else:
            _render(qc, tmp, detector)
    return path


def _render(qc, path, detector: str) -> None:
    """:func:`plot_qc` written as PNG to a path or a binary file object (here or in the
    :class:`FigureProcess` child: the same bytes)."""
    # zlib level 1: the same pixels, ~10 % more bytes, 30 % less time than the default 6
    plot_qc(qc, detector).savefig(path, dpi=90, format="png", pil_kwargs={"compress_level": 1})


class _Columns(dict):
    """A QC table as a plain dict of columns (what :func:`plot_qc` reads of a Table)."""

    @property
    def colnames(self) -> list:
        return list(self.keys())

    def __len__(self) -> int:
        return len(self["filename"])


class FigureProcess:
    """Draw QC figures in a forked child process that imports matplotlib at once.

    Importing matplotlib and drawing the first figure of a process cost ~0.4 s,
    a tenth of ``spotflat calibrate`` on 1400 files. A child forked at the
    start of the command does that on another core while the parent reads and
    fits; the parent sends the QC columns through a pipe as soon as they are
    final (:meth:`submit`, while it still computes the catalogue and writes
    it) and later takes the PNG bytes back (:meth:`collect`). Where no fork is
    possible (no ``os.fork``, or threads already running: a forked child could
    inherit a held lock) or the child fails, :meth:`collect` returns None and
    the caller draws in its own process, so the outputs never depend on the
    child.
    """

    def __init__(self) -> None:
        import threading

        self.pid = None
        if not hasattr(os, "fork") or threading.active_count() > 1:
            return
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            for fd in (r1, w1, r2, w2):
                os.close(fd)
            return
        if pid == 0:  # the child: never returns into the caller's code
            code = 1
            try:
                os.close(w1)
                os.close(r2)
                # below everything else: its imports take what the parent leaves of the cores
                # (the readers use both, the fit one) instead of slowing the parent down
                os.nice(19)
                _serve(r1, w2)
                code = 0
            except BaseException:  # noqa: BLE001 -- the parent sees the closed pipe and falls back
                pass
            finally:
                os._exit(code)  # no atexit handlers, no parent's clean-up run twice
        os.close(r1)
        os.close(w2)
        self.pid = pid
        self._to = os.fdopen(w1, "wb")
        self._from = os.fdopen(r2, "rb")

    def draw(self, qc, detector: str = "") -> bytes | None:
        """The PNG of :func:`plot_qc` of ``qc``, drawn by the child; None when it could not."""
        return self.collect() if self.submit(qc, detector) else None

    def submit(self, qc, detector: str = "") -> bool:
        """Start the child drawing ``qc``'s figure (:meth:`collect` gets it); False when it cannot.

        Drawings are collected in the order they were submitted.
        """
        import pickle

        if self.pid is None:
            return False
        cols = {name: np.asarray(qc[name]) for name in qc.colnames}
        try:
            pickle.dump((cols, detector), self._to, protocol=pickle.HIGHEST_PROTOCOL)
            self._to.flush()
        except (OSError, pickle.PickleError):
            self.close()
            return False
        return True

    def collect(self) -> bytes | None:
        """The PNG of the oldest drawing :meth:`submit` asked for (waits); None when it failed."""
        import pickle

        if self.pid is None:
            return None
        try:
            reply = pickle.load(self._from)
        except (OSError, EOFError, pickle.PickleError):
            self.close()
            return None
        return reply if isinstance(reply, bytes) else None

    def close(self) -> None:
        """End the child (it exits on the closed pipe) and reap it."""
        if self.pid is None:
            return
        for f in (self._to, self._from):
            try:
                f.close()
            except OSError:
                pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        self.pid = None

    def __enter__(self) -> "FigureProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _serve(rfd: int, wfd: int) -> None:
    """The child of :class:`FigureProcess`: import, then draw each request until EOF."""
    import io
    import pickle

    from matplotlib.backends import backend_agg  # noqa: F401 -- the imports are the point
    from matplotlib.figure import Figure  # noqa: F401

    _plain_log()
    with os.fdopen(rfd, "rb") as rf, os.fdopen(wfd, "wb") as wf:
        while True:
            try:
                cols, detector = pickle.load(rf)
            except EOFError:
                return
            try:
                buf = io.BytesIO()
                _render(_Columns(cols), buf, detector)
                reply = buf.getvalue()
            except Exception as exc:  # noqa: BLE001 -- the parent redraws and reports it
                reply = f"error: {exc}"
            pickle.dump(reply, wf)
            wf.flush()
