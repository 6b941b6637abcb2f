"""Benchmark the focal-plane mode: serial vs a local process pool vs a Dask LocalCluster.

Writes a synthetic focal-plane run -- ``--ndet`` CCDs x ``--nexp`` DM grid
catalogues of 2401 spots each (default 21 x 200 = 4200 files) and a flat for
the first ``--ncorr`` CCDs -- then runs, each in a fresh process so that its
peak memory is its own:

* ``serial``: :class:`spotflat.parallel.Runner` with ``workers=1``,
* ``pool``: ``workers=N`` local processes (``--workers``, default 2; pool
  start-up included, as in ``spotflat calibrate --workers N``),
* ``dask``: a running ``LocalCluster(n_workers=N, processes=True,
  threads_per_worker=1)`` (cluster start-up excluded: ``--scheduler`` means
  a scheduler that is already running).

Each run does the focal-plane calibrate (all CCDs, catalogues written) and
the focal-plane correlate of ``--ncorr`` CCDs (``--nboot`` bootstrap and null
resamples, no per-CCD figures). Printed: times, speed-ups against serial
measured in the same run, peak RSS of the driver and of each worker, and
whether every mode gave the same numbers bit for bit.

Usage::

    python benchmarks/bench_focalplane.py                       # 21 x 200, 4 CCDs correlated
    python benchmarks/bench_focalplane.py --ndet 4 --nexp 50 --ncorr 2   # quick
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits


def detectors(n: int) -> list[str]:
    from spotflat.geometry import get_camera

    return get_camera().science_detectors[:n]


def write_grids(root: Path, dets: list[str], nexp: int, seed: int = 0) -> int:
    """DM grid catalogues (the columns spotflat reads) for every detector."""
    from spotflat.grids import grid_positions

    rng = np.random.default_rng(seed)
    nspot = 2401
    gx, gy = grid_positions(2036.0, 2000.0, 65.3, 65.3, 0.01, 49, 49)
    n = 0
    for det in dets:
        raft, sensor = det.split("_")
        d = root / det
        d.mkdir(parents=True)
        F = rng.uniform(8e4, 1.2e5, nspot)
        for j in range(nexp):
            idx = np.arange(nspot, dtype=float)
            idx[rng.random(nspot) < 0.02] = np.nan
            k = np.arange(nspot)
            dx, dy = rng.uniform(-30, 30, 2)
            cols = {
                "base_SdssCentroid_x": gx + dx + rng.normal(0, 0.3, nspot),
                "base_SdssCentroid_y": gy + dy + rng.normal(0, 0.3, nspot),
                "base_SdssShape_xx": rng.normal(5, 0.1, nspot), "base_SdssShape_yy": rng.normal(5, 0.1, nspot),
                "base_SdssShape_xy": rng.normal(0, 0.1, nspot),
                "base_SdssShape_instFlux": F[k] * rng.normal(1, 0.005, nspot) * (1 + 0.05 * np.sin(j)),
                "base_SdssShape_instFluxErr": np.sqrt(F[k]),
                "spotgrid_index": idx, "spotgrid_x": gx + dx, "spotgrid_y": gy + dy,
            }
            hdu = fits.BinTableHDU.from_columns([fits.Column(name=c, array=v, format="D") for c, v in cols.items()])
            info = fits.BinTableHDU(name="GRID_INFO")
            for key, val in zip(("X0", "Y0", "XSTEP", "YSTEP", "THETA", "NCOLS", "NROWS"),
                                (2036.0 + dx, 2000.0 + dy, 65.3, 65.3, 0.01, 49, 49)):
                info.header[key] = val
            name = f"MC_C_20200110_{j:06d}_{raft}_{sensor}_20.0s_{-10 + 0.01 * j:.2f}x_{5.0 + 0.003 * j:.2f}y_gridfit.cat"
            fits.HDUList([fits.PrimaryHDU(), hdu, info]).writeto(d / name)
            n += 1
    return n


def write_flats(root: Path, dets: list[str], seed: int = 0) -> None:
    """A smooth flat with pixel noise per CCD (assembled image, detector in the name)."""
    from spotflat.geometry import ccd_shape

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for det in dets:
        ny, nx = ccd_shape(det)
        y, x = np.mgrid[0:ny, 0:nx].astype(np.float32)
        img = 5e4 * (1 + 0.02 * np.sin(x / 300.0) * np.cos(y / 410.0)) * (1 + 0.003 * rng.standard_normal((ny, nx)))
        hdu = fits.PrimaryHDU(img.astype(np.float32))
        hdu.header["RAFTBAY"], hdu.header["CCDSLOT"] = det.split("_")
        hdu.writeto(root / f"ccob_flat_{det}.fits")


def _peak_rss(_=None) -> tuple[int, float]:
    time.sleep(0.3)  # keep this worker busy so the others take the sibling tasks
    return os.getpid(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(mode: str, work: str, workers: int, ncorr: int, nboot: int) -> None:
    from spotflat.calibration import write_calibration
    from spotflat.focalplane import calibrate_detectors, correlate_focal_plane, find_calibrations, find_flats
    from spotflat.grids import find_grid_files, group_by_detector
    from spotflat.parallel import Runner

    work = Path(work)
    out = work / mode
    cluster = None
    if mode == "dask":
        from distributed import LocalCluster

        cluster = LocalCluster(n_workers=workers, processes=True, threads_per_worker=1, dashboard_address=None,
                               host="127.0.0.1")
        runner = Runner(scheduler=cluster.scheduler_address)
    else:
        runner = Runner(workers=1 if mode == "serial" else workers)
    try:
        t0 = time.perf_counter()
        groups = group_by_detector(find_grid_files(work / "tree"))
        cals = calibrate_detectors(groups, runner)
        (out / "calib").mkdir(parents=True)
        for det, cal in cals.items():
            write_calibration(cal, out / "calib" / f"calib_{det}.fits")
        t_cal = time.perf_counter() - t0
        calibs = dict(list(find_calibrations(out / "calib").items())[:ncorr])
        t0 = time.perf_counter()
        res = correlate_focal_plane(calibs, find_flats(work / "flats", list(calibs)), out / "fp", runner=runner,
                                    figures=False, nboot=nboot, nnull=nboot)
        t_cor = time.perf_counter() - t0
        if runner.kind == "serial":
            workers_rss = []
        elif runner.kind == "dask":
            workers_rss = [v for _, v in runner._client.run(_peak_rss).values()]
        else:
            workers_rss = sorted(dict(runner.map(_peak_rss, range(4 * workers))).values())
        digest = {det: hashlib.sha256(np.asarray(cal.spots["flux"]).tobytes()
                                      + np.asarray(cal.exposures["scale"]).tobytes()).hexdigest()
                  for det, cal in cals.items()}
        rs = [float(r) for r in res.summary["r"]]
    finally:
        runner.close()
        if cluster is not None:
            cluster.close()
    print(json.dumps({"cal": t_cal, "cor": t_cor, "driver": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "workers": workers_rss, "digest": digest, "r": rs}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ndet", type=int, default=21, help="CCDs (default 21: R01..R03 and more)")
    ap.add_argument("--nexp", type=int, default=200, help="exposures per CCD (default 200)")
    ap.add_argument("--ncorr", type=int, default=4, help="CCDs also correlated (a flat each; default 4)")
    ap.add_argument("--nboot", type=int, default=200, help="bootstrap and null resamples (default 200)")
    ap.add_argument("--workers", type=int, default=2, help="local processes / Dask workers (default 2)")
    ap.add_argument("--skip-dask", action="store_true", help="skip the LocalCluster run")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--write", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write:
        dets = detectors(args.ndet)
        nfiles = write_grids(Path(args.write) / "tree", dets, args.nexp)
        write_flats(Path(args.write) / "flats", dets[:min(args.ncorr, args.ndet)])
        print(nfiles)
        return
    if args.child:
        mode, work, workers, ncorr, nboot = args.child
        _child(mode, work, int(workers), int(ncorr), int(nboot))
        return
    ncorr = min(args.ncorr, args.ndet)
    with tempfile.TemporaryDirectory(prefix="bench_focalplane_") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        # written by a child process: a process's peak RSS survives exec, so the
        # timed children must not be forked from a parent that held the flats
        nfiles = int(subprocess.run([sys.executable, __file__, "--write", str(work), "--ndet", str(args.ndet),
                                     "--nexp", str(args.nexp), "--ncorr", str(ncorr)],
                                    check=True, capture_output=True, text=True).stdout.split()[-1])
        print(f"wrote {nfiles} catalogues ({args.ndet} CCDs x {args.nexp} exposures x 2401 spots) and "
              f"{ncorr} flats in {time.perf_counter() - t0:.1f} s; {os.cpu_count()} cores")
        modes = ["serial", "pool"] + ([] if args.skip_dask else ["dask"])
        res = {}
        for mode in modes:
            p = subprocess.run([sys.executable, __file__, "--child", mode, str(work), str(args.workers), str(ncorr),
                                str(args.nboot)], capture_output=True, text=True)
            if p.returncode:
                sys.exit(f"{mode} run failed:\n{p.stderr[-3000:]}")
            res[mode] = json.loads(p.stdout.strip().splitlines()[-1])
    s = res["serial"]
    print(f"{'mode':<22}{'calibrate':>11}{'speed-up':>9}{'correlate':>11}{'speed-up':>9}"
          f"{'driver RSS':>12}{'worker RSS (peak each)':>26}")
    label = {"serial": "serial", "pool": f"--workers {args.workers}", "dask": f"LocalCluster x{args.workers}"}
    for mode in modes:
        r = res[mode]
        w = ", ".join(f"{v:.0f}" for v in r["workers"]) or "-"
        print(f"{label[mode]:<22}{r['cal']:>9.1f} s{s['cal'] / r['cal']:>8.2f}x{r['cor']:>9.1f} s"
              f"{s['cor'] / r['cor']:>8.2f}x{r['driver']:>8.0f} MiB{w:>22} MiB")
    same = all(res[m]["digest"] == s["digest"] and res[m]["r"] == s["r"] for m in modes)
    print(f"calibration catalogues and correlations identical across modes: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
