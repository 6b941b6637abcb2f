"""The execution layer: serial, local process pool and a real Dask LocalCluster give the same results.

Also: a worker killed mid-run fails the run cleanly (or is retried by Dask),
and an unreachable scheduler fails fast.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from gridfiles import write_run
from spotflat.calibration import read_calibration
from spotflat.focalplane import _calibrate_one as par_task
from spotflat.focalplane import calibrate_detectors
from spotflat.grids import find_grid_files, group_by_detector, read_grids
from spotflat.parallel import Runner, WorkerError, chunked, nchunks_for

distributed = pytest.importorskip("distributed")

DETS = ("R02_S02", "R22_S11")


# ----------------------------------------------------------------------------- tasks (module level: picklable)
def _square(x):
    return x * x


def _slow_square(x):
    time.sleep(1.0)
    return x * x


def _die(x):
    if x == 1:
        os._exit(3)  # a worker dying hard: no exception, no clean-up
    time.sleep(0.5)
    return x


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster():
    import dask
    from distributed import LocalCluster

    # one retry after a worker death, then give up: keeps the failure tests short
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        lc = LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
                          host="127.0.0.1")
    yield lc
    lc.close()


@pytest.fixture(scope="module")
def grid_tree(tmp_path_factory):
    """Small processed grids of three detectors in one tree."""
    root = tmp_path_factory.mktemp("grids") / "tree"
    write_run(root / "R22_S11", nexp=40, ncols=8, nrows=8, det="R22_S11", seed=1)
    write_run(root / "R10_S02", nexp=12, ncols=8, nrows=8, det="R10_S02", seed=2)
    write_run(root / "R01_S00", nexp=9, ncols=8, nrows=8, det="R01_S00", seed=3)
    return root


@pytest.fixture(scope="module")
def sim_tree(tmp_path_factory):
    """Two simulated detectors: spot-data tree, folder of flats, folder of catalogues (serial)."""
    from spotflat.simulate import simulate_run

    base = tmp_path_factory.mktemp("sim")
    (base / "tree").mkdir()
    (base / "flats").mkdir()
    for i, det in enumerate(DETS):
        res = simulate_run(base / "raw" / det, detector=det, ndither=6, seed=10 + i, ncols=12, nrows=12,
                           xstep=300.0)
        os.replace(res.outdir / "spotdata", base / "tree" / det)
        os.replace(res.flat_path, base / "flats" / res.flat_path.name)
    shutil.rmtree(base / "raw")
    groups = group_by_detector(find_grid_files(base / "tree"))
    from spotflat.calibration import write_calibration

    (base / "calib").mkdir()
    for det, cal in calibrate_detectors(groups).items():
        write_calibration(cal, base / "calib" / f"calib_{det}.fits")
    return base


CORR = ("--nboot", 40, "--nnull", 40, "--no-figures", "-q")


@pytest.fixture(scope="module")
def serial_fp(sim_tree, tmp_path_factory):
    """The serial focal-plane correlate run everything else is compared with."""
    from click.testing import CliRunner

    from spotflat.cli import main

    out = tmp_path_factory.mktemp("serial") / "fp"
    res = CliRunner().invoke(main, [str(a) for a in ("correlate", sim_tree / "calib", "--flat-dir",
                                                     sim_tree / "flats", "-o", out, "-j", 1, *CORR)])
    assert res.exit_code == 0, res.output
    return out


# ----------------------------------------------------------------------------- helpers
def _same_table(a: Table, b: Table) -> None:
    assert a.colnames == b.colnames
    for c in a.colnames:
        x, y = np.asarray(a[c]), np.asarray(b[c])
        if x.dtype.kind == "f":
            assert np.array_equal(x, y, equal_nan=True), c  # bit for bit, NaN where NaN
        else:
            assert np.array_equal(x, y), c


def _same_calibration(p: Path, q: Path) -> None:
    a, b = read_calibration(p), read_calibration(q)
    _same_table(a.spots, b.spots)
    _same_table(a.exposures, b.exposures)
    assert {k: v for k, v in a.meta.items() if k != "DATE"} == {k: v for k, v in b.meta.items() if k != "DATE"}


def _same_focal_plane(a: Path, b: Path) -> None:
    for det in DETS:
        for name in ("results.ecsv", "residuals.fits", "amp_summary.ecsv"):
            _same_table(Table.read(a / det / name), Table.read(b / det / name))
    for name in ("focal_plane_summary.ecsv", "focal_plane_amps.ecsv"):
        _same_table(Table.read(a / name), Table.read(b / name))
    assert (b / "focal_plane.png").stat().st_size > 10_000
    assert not list(b.glob(".spotflat-*"))


def _one_error_line(res) -> str:
    lines = [ln for ln in res.output.strip().splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the layer itself
def test_chunks_keep_order_and_bounds():
    items = list(range(23))
    for n in (1, 2, 5, 23, 40):
        parts = chunked(items, n)
        assert sum(parts, []) == items and len(parts) == min(n, 23)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert nchunks_for(10, 2) == 1                       # too small to be worth shipping
    assert nchunks_for(1400, 2) == 6                     # <= 256 files per chunk: bounded memory
    assert all(len(c) <= 256 for c in chunked(range(5000), nchunks_for(5000, 2)))


def test_runner_orders_results_like_serial():
    with Runner(workers=1) as r:
        assert r.kind == "serial" and r.map(_square, range(7)) == [x * x for x in range(7)]
    with Runner(workers=2) as r:
        assert r.kind == "processes" and r.describe() == "2 local processes"
        assert r.map(_square, range(30)) == [x * x for x in range(30)]
    with pytest.raises(Exception, match="workers must be >= 1"):
        Runner(workers=0)


# ----------------------------------------------------------------------------- calibrate
def test_calibrate_process_pool_equals_serial(grid_tree, tmp_path):
    from spotflat.calibration import write_calibration

    groups = group_by_detector(find_grid_files(grid_tree))
    serial = calibrate_detectors(groups)
    with Runner(workers=2) as r:
        by_detector = calibrate_detectors(groups, r)                        # 3 detectors >= 2 workers
        by_files = calibrate_detectors({"R22_S11": groups["R22_S11"]}, r, min_chunk=4,
                                       split_files=True)                  # chunks of files
    for name, cals in (("serial", serial), ("det", by_detector), ("files", by_files)):
        (tmp_path / name).mkdir()
        for det, cal in cals.items():
            write_calibration(cal, tmp_path / name / f"{det}.fits")
    for det in groups:
        _same_calibration(tmp_path / "serial" / f"{det}.fits", tmp_path / "det" / f"{det}.fits")
    _same_calibration(tmp_path / "serial" / "R22_S11.fits", tmp_path / "files" / "R22_S11.fits")


def test_chunked_reading_on_dask_is_exact(grid_tree, cluster):
    from spotflat.focalplane import read_grids_chunked

    paths = group_by_detector(find_grid_files(grid_tree))["R22_S11"]
    with Runner(scheduler=cluster.scheduler_address) as r:
        assert r.kind == "dask" and r.nworkers == 2
        g = read_grids_chunked(paths, r, detector="R22_S11", min_chunk=3)   # 4 chunks of 10 files
    ref = read_grids(paths, detector="R22_S11")
    for q in ("flux", "flux_err", "x", "y", "dx", "dy", "xx", "yy", "xy"):
        assert np.array_equal(getattr(g, q), getattr(ref, q), equal_nan=True), q
    _same_table(g.exposures, ref.exposures)


def test_full_grid_calibration_is_bit_identical_on_dask(tmp_path, cluster):
    """2401 spots x 200 exposures: large enough for BLAS to thread its reductions.

    The catalogue then depends on the BLAS thread count unless every task runs
    on one BLAS thread (Dask workers start with one, this process with more).
    """
    import spotflat.parallel as par
    from spotflat.calibration import write_calibration

    paths, *_ = write_run(tmp_path / "big", nexp=200, ncols=49, nrows=49, det="R22_S11")
    serial = calibrate_detectors({"R22_S11": paths})["R22_S11"]
    with Runner(scheduler=cluster.scheduler_address) as r:
        on_dask = calibrate_detectors({"R22_S11": paths}, r, min_chunk=50)["R22_S11"]   # 4 chunks
        by_detector = r.map(par_task, [("R22_S11", [str(p) for p in paths], None, "clipped", 3, 4.0)])[0]
    for name, cal in (("serial", serial), ("dask", on_dask), ("det", by_detector)):
        write_calibration(cal, tmp_path / f"{name}.fits")
    _same_calibration(tmp_path / "serial.fits", tmp_path / "dask.fits")
    _same_calibration(tmp_path / "serial.fits", tmp_path / "det.fits")
    from spotflat.blas import _openblas_controls

    controls = _openblas_controls()
    if controls:
        before = [get() for get, _ in controls]
        with par.single_thread_blas():
            assert [get() for get, _ in controls] == [1] * len(controls)
        assert [get() for get, _ in controls] == before


def test_calibrate_cli_dask_and_pool_equal_serial(grid_tree, cluster, tmp_path, run_cli):
    res = run_cli("calibrate", grid_tree, "-o", f"{tmp_path / 'serial'}/", "-j", 1, "-q")
    assert res.exit_code == 0, res.output
    assert "Calibration of 3 detectors" in res.output
    res = run_cli("calibrate", grid_tree, "-o", f"{tmp_path / 'dask'}/", "--scheduler",
                  cluster.scheduler_address, "-q")
    assert res.exit_code == 0, res.output
    assert f"Dask at {cluster.scheduler_address}" in res.output
    res = run_cli("calibrate", grid_tree, "-o", tmp_path / "pool.fits", "-j", 2, "-q")   # prefix form
    assert res.exit_code == 0, res.output
    for det in ("R01_S00", "R10_S02", "R22_S11"):
        ref = tmp_path / "serial" / f"calib_{det}.fits"
        _same_calibration(ref, tmp_path / "dask" / f"calib_{det}.fits")
        _same_calibration(ref, tmp_path / f"pool_{det}.fits")


def test_calibrate_bad_file_in_a_worker_writes_nothing(tmp_path, run_cli):
    write_run(tmp_path / "t" / "R22_S11", nexp=6, ncols=4, nrows=4, det="R22_S11")
    paths, *_ = write_run(tmp_path / "t" / "R10_S02", nexp=6, ncols=4, nrows=4, det="R10_S02")
    full = paths[3].read_bytes()
    paths[3].write_bytes(full[: len(full) // 2])
    res = run_cli("calibrate", tmp_path / "t", "-o", f"{tmp_path / 'out'}/", "-j", 2, "-q")
    assert res.exit_code == 1
    assert paths[3].name in _one_error_line(res)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- correlate
def test_focal_plane_serial_outputs(serial_fp, sim_tree, run_cli, tmp_path):
    s = Table.read(serial_fp / "focal_plane_summary.ecsv")
    assert list(s["detector"]) == list(DETS)
    for c in ("r", "r_err_bootstrap", "r_err_jackknife", "r_err_block", "p_value", "slope", "slope_err", "d_rms"):
        assert np.all(np.isfinite(s[c])), c
    amps = Table.read(serial_fp / "focal_plane_amps.ecsv")
    assert set(amps["detector"]) == set(DETS) and {"amp", "r", "d_rms"} <= set(amps.colnames)
    assert (serial_fp / "focal_plane.png").exists()
    # the single-detector form is unchanged and gives that detector the same numbers
    det = DETS[1]
    res = run_cli("correlate", sim_tree / "calib" / f"calib_{det}.fits", "--flat",
                  sim_tree / "flats" / f"ccob_flat_{det}.fits", "-o", tmp_path / "single", *CORR)
    assert res.exit_code == 0, res.output
    assert f"Spot-vs-flat correlation for {det}" in res.output
    _same_table(Table.read(tmp_path / "single" / "results.ecsv"), Table.read(serial_fp / det / "results.ecsv"))
    assert not (tmp_path / "single" / "focal_plane_summary.ecsv").exists()


def test_focal_plane_dask_equals_serial(serial_fp, sim_tree, cluster, tmp_path, run_cli):
    out = tmp_path / "dask"
    res = run_cli("correlate", f"{sim_tree / 'calib'}/calib_*.fits", sim_tree / "tree", "--flat-dir",
                  sim_tree / "flats", "-o", out, "--scheduler", cluster.scheduler_address, *CORR)
    assert res.exit_code == 0, res.output
    _same_focal_plane(serial_fp, out)


def test_focal_plane_process_pool_equals_serial(serial_fp, sim_tree, tmp_path, run_cli):
    out = tmp_path / "pool"
    res = run_cli("correlate", sim_tree / "calib", "--flat-dir", sim_tree / "flats", "-o", out, "-j", 2, *CORR)
    assert res.exit_code == 0, res.output
    assert "2 local processes" in res.output
    _same_focal_plane(serial_fp, out)


def test_focal_plane_usage_and_missing_flat(sim_tree, tmp_path, run_cli):
    res = run_cli("correlate", sim_tree / "calib", "--flat", sim_tree / "flats" / "x.fits", "-o", tmp_path / "o")
    assert res.exit_code == 2 and "--flat-dir" in res.output
    (tmp_path / "flats").mkdir()
    shutil.copy(sim_tree / "flats" / f"ccob_flat_{DETS[0]}.fits", tmp_path / "flats")
    res = run_cli("correlate", sim_tree / "calib", "--flat-dir", tmp_path / "flats", "-o", tmp_path / "o", "-q")
    assert res.exit_code == 1 and f"no flat for 1 detector(s): {DETS[1]}" in _one_error_line(res)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- failures
def test_unreachable_scheduler_fails_fast(tmp_path, run_cli, grid_tree):
    address = f"tcp://127.0.0.1:{_free_port()}"
    t0 = time.perf_counter()
    res = run_cli("calibrate", grid_tree, "-o", tmp_path / "c.fits", "--scheduler", address)
    assert time.perf_counter() - t0 < 15
    assert res.exit_code == 1
    assert f"cannot reach the Dask scheduler at {address}" in _one_error_line(res)
    assert not list(tmp_path.iterdir())


def test_pool_worker_death_is_a_clean_error():
    with Runner(workers=2) as r:
        with pytest.raises(WorkerError, match="a worker process died while running dying tasks"):
            r.map(_die, range(4), label="Running dying tasks")
        assert r.map(_square, range(4)) == [0, 1, 4, 9]  # a fresh pool afterwards


def _pool_worker_pids() -> list[int]:
    """Processes forked by multiprocessing's fork server: the pool's workers."""
    from multiprocessing import forkserver

    server = getattr(forkserver._forkserver, "_forkserver_pid", None)
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if server and int(fields[1]) == server:
            pids.append(int(stat.parent.name))
    return pids


def _killer(find_victims, stop: threading.Event, max_kills: int, kills: list) -> None:
    while not stop.is_set() and len(kills) < max_kills:
        for pid in find_victims():
            try:
                os.kill(pid, signal.SIGKILL)
                kills.append(pid)
            except (ProcessLookupError, PermissionError):
                pass
            break
        stop.wait(0.3)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the workers")
def test_pool_worker_killed_mid_run_writes_nothing(sim_tree, tmp_path, run_cli):
    stop, kills = threading.Event(), []
    victims = lambda: _pool_worker_pids() if time.perf_counter() - t0 > 1.0 else []  # noqa: E731
    t0 = time.perf_counter()
    th = threading.Thread(target=_killer, args=(victims, stop, 1, kills), daemon=True)
    th.start()
    try:
        res = run_cli("correlate", sim_tree / "calib", "--flat-dir", sim_tree / "flats", "-o", tmp_path / "o",
                      "-j", 2, *CORR)
    finally:
        stop.set()
        th.join()
    assert kills, "no worker was killed"
    assert res.exit_code == 1
    assert "worker process died" in _one_error_line(res)
    assert not (tmp_path / "o").exists()


def test_dask_retries_a_killed_worker(cluster):
    from distributed import Client

    with Client(cluster.scheduler_address, set_as_default=False) as c:
        c.wait_for_workers(2, timeout=30)
        stop, kills = threading.Event(), []

        def victims():
            busy = [a for a, keys in c.processing().items() if keys]
            return [c.run(os.getpid, workers=busy[:1])[busy[0]]] if busy else []

        th = threading.Thread(target=_killer, args=(victims, stop, 1, kills), daemon=True)
        th.start()
        try:
            with Runner(scheduler=c) as r:
                out = r.map(_slow_square, range(3), label="Squaring slowly")
        finally:
            stop.set()
            th.join()
        assert kills and out == [0, 1, 4]


def test_dask_worker_killed_mid_run_fails_cleanly(sim_tree, cluster, tmp_path, run_cli):
    from distributed import Client

    with Client(cluster.scheduler_address, set_as_default=False) as c:
        c.wait_for_workers(2, timeout=30)
        stop, kills = threading.Event(), []

        def victims():
            busy = [a for a, keys in c.processing().items() if keys]
            try:
                return [c.run(os.getpid, workers=busy[:1])[busy[0]]] if busy else []
            except Exception:  # the worker went away between the two calls
                return []

        th = threading.Thread(target=_killer, args=(victims, stop, 8, kills), daemon=True)
        th.start()
        try:
            res = run_cli("correlate", sim_tree / "calib", "--flat-dir", sim_tree / "flats", "-o", tmp_path / "o",
                          "--scheduler", cluster.scheduler_address, *CORR)
        finally:
            stop.set()
            th.join()
        assert kills
        assert res.exit_code == 1, res.output
        assert "Dask worker died" in _one_error_line(res)
        assert not (tmp_path / "o").exists()
        c.wait_for_workers(2, timeout=30)  # the nannies bring the workers back
