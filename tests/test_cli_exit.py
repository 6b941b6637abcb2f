"""The console script's quick exit (spotflat.cli.console_main): outputs, exit codes, exit
handlers and running threads are as with the usual interpreter exit."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from astropy.io import fits

from gridfiles import write_run


def _run(code: str, *args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, timeout=300, **kw)


def test_calibrate_outputs_and_exit_code(tmp_path):
    write_run(tmp_path / "d", nexp=8, ncols=9, nrows=9, seed=1)
    out = tmp_path / "cal.fits"
    res = subprocess.run([sys.executable, "-m", "spotflat.cli", "calibrate", str(tmp_path / "d"), "-o", str(out),
                          "-q"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "Calibration of" in res.stdout and str(out) in res.stdout  # stdout flushed before the exit
    with fits.open(out) as h:
        assert [x.name for x in h[1:]] == ["SPOTS", "EXPOSURES", "USED"] and len(h["SPOTS"].data) == 81
    assert (tmp_path / "cal_qc.ecsv").stat().st_size > 0 and (tmp_path / "cal_qc.png").stat().st_size > 0
    bad = subprocess.run([sys.executable, "-m", "spotflat.cli", "calibrate", str(tmp_path / "none"), "-o",
                          str(tmp_path / "x.fits")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "no such directory" in bad.stderr


def test_exit_handlers_run_and_threads_finish(tmp_path):
    mark, late = tmp_path / "atexit.txt", tmp_path / "thread.txt"
    res = _run("""
        import atexit, sys, threading, time
        from pathlib import Path
        mark = Path(sys.argv[1])
        atexit.register(lambda: mark.write_text("ran"))

        class Torn:
            def __del__(self):
                sys.stderr.write("torn down")

        kept = Torn()  # dropped only when the interpreter tears its modules down
        sys.argv = ["spotflat", "--version"]
        from spotflat.cli import console_main
        console_main()
        """, mark)
    assert res.returncode == 0 and "version" in res.stdout.lower() and mark.read_text() == "ran"
    assert "torn down" not in res.stderr  # the quick exit: no teardown
    res = _run("""
        import sys, threading, time
        from pathlib import Path
        out = Path(sys.argv[1])
        threading.Thread(target=lambda: (time.sleep(0.3), out.write_text("done"))).start()
        sys.argv = ["spotflat", "--help"]
        from spotflat.cli import console_main
        console_main()
        """, late)
    assert res.returncode == 0 and late.read_text() == "done"  # not cut short by the quick exit


def test_closed_pipe_is_no_error():
    res = subprocess.run(f"{sys.executable} -m spotflat.cli --help | head -c 10", shell=True,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "Traceback" not in res.stderr and "Error" not in res.stderr
