"""The QC figure: its panels and their content, drawn without mathtext (cheap to render)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gridfiles import write_run
from spotflat.calibration import build_calibration
from spotflat.grids import read_grids
from spotflat.qc import QCOptions
from spotflat.qcplot import plot_qc, write_qc_figure


@pytest.fixture(scope="module")
def qc(tmp_path_factory):
    d = tmp_path_factory.mktemp("qcplot") / "spotdata"
    write_run(d, nexp=8, ncols=6, nrows=6)
    names = sorted(p.name for p in d.iterdir())
    cal = build_calibration(read_grids(d), qc=QCOptions(drop=(names[2],)))
    return cal.qc


def test_figure_content(qc):
    fig = plot_qc(qc, "R22_S11")
    fig.canvas.draw()
    axes = fig.axes
    assert len(axes) == 4
    used = np.asarray(qc["used"], bool)
    assert used.sum() == len(qc) - 1
    # the dropped exposure is marked and named in the three per-exposure panels
    dropped = str(qc["filename"][~used][0])
    for a in axes[:3]:
        assert dropped in [t.get_text() for t in a.texts]
    # the grid centres lie on the CCD outline panel, used and excluded apart
    xs = np.concatenate([ln.get_xdata() for ln in axes[3].lines[1:]])
    assert np.allclose(np.sort(xs), np.sort(np.asarray(qc["x_centre"], float)))
    assert "7/8 exposures used" in fig._suptitle.get_text()


def test_log_axes_plain_labels(qc):
    """Log-axis tick labels are plain numbers: mathtext (10^n labels) cost ~0.3 s per process."""
    fig = plot_qc(qc, "R22_S11")
    fig.canvas.draw()
    for a in fig.axes[:2]:
        assert a.get_yscale() == "log"
        labels = [t.get_text() for t in a.get_yticklabels(which="both") if t.get_text()]
        assert labels, "no tick labels on a log axis"
        assert all("$" not in s for s in labels), labels
        for s in labels:
            float(s.replace("\N{MINUS SIGN}", "-"))  # each one reads as a number


def test_write_png(qc, tmp_path):
    path = write_qc_figure(qc, tmp_path / "qc.png", "R22_S11")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 500 and im.size[1] > 400
    assert not list(tmp_path.glob(".*tmp*"))


_CHILD_CHECK = """
import os, sys
from pathlib import Path
from astropy.table import Table
from spotflat.qcplot import FigureProcess, write_qc_figure

qc, tmp = Table.read(sys.argv[1]), Path(sys.argv[2])
here = write_qc_figure(qc, tmp / "here.png", "R22_S11")
with FigureProcess() as helper:
    assert helper.pid is not None, "no fork in a fresh process"
    assert helper.draw(qc, "R22_S11") == here.read_bytes()
    # submitted early, collected later, in order (the command submits as soon as the QC is final)
    assert helper.submit(qc, "R22_S11") and helper.submit(qc[:5], "R22_S11")
    first, second = helper.collect(), helper.collect()
    assert first == here.read_bytes() and second != first
    out = write_qc_figure(qc, tmp / "given.png", "R22_S11", png=first)
    assert out.read_bytes() == here.read_bytes()
    pid = helper.pid
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    helper.pid = pid  # as if still alive: the broken pipe must make draw() fail, not hang
    assert helper.draw(qc, "R22_S11") is None
    out = write_qc_figure(qc, tmp / "fallback.png", "R22_S11", helper=helper)
    assert out.read_bytes() == here.read_bytes()
assert helper.pid is None
print("ok")
"""


def test_figure_process_draws_the_same_png(qc, tmp_path):
    """The forked helper writes the very PNG this process would; a dead helper
    falls back to drawing here, and nothing of it is left running. Run in a
    fresh process, as the command line is: the test process may have threads
    (then no fork is attempted)."""
    import os
    import subprocess
    import sys

    if not hasattr(os, "fork"):
        pytest.skip("no os.fork on this platform")
    qc.write(tmp_path / "qc.ecsv")
    res = subprocess.run([sys.executable, "-c", _CHILD_CHECK, str(tmp_path / "qc.ecsv"), str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
