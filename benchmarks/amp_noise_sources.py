"""Where the spread of the ``amp`` slope comes from, in the ``response`` scenario.

Issue 12's calibration table has the amplifier-level slope's error at 0.83x its
spread over realisations when the flat sees the spots' response. This script
runs the same realisations as ``calibrate_errors.py run response`` (R22_S11,
50 dithers, defaults) and fits the ``amp`` component four ways, with the
measured or the true (noiseless) spot throughput ``t`` and flat ``q``:

* ``tq``: what ``spotflat correlate`` does (measured ``t``, measured ``q``);
* ``tq0``: measured ``t``, true ``q`` (the spots' noise and the calibration only);
* ``t0q``: true ``t``, measured ``q`` (the flat's photon noise only);
* ``t0q0``: both true (model error only).

Usage::

    python benchmarks/amp_noise_sources.py run --first-seed 100 -n 80 -o amp_sources.npy [--no-clip]
    python benchmarks/amp_noise_sources.py table amp_sources.npy

``--no-clip`` compares without dropping the points the calibration clipped;
``--outlier-fraction 0`` simulates no outlier points (cosmic rays, blends).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

COMBOS = ("tq", "tq0", "t0q", "t0q0")


def realisation(seed: int, clip: bool = True, outlier_fraction: float | None = None,
                seam: float | None = None) -> dict:
    from calibrate_errors import DETECTOR, grids_from_simulation

    from spotflat.calibration import build_calibration
    from spotflat.compare import compare_spots_flat
    from spotflat.components import analyse_components
    from spotflat.eiv import flat_electrons
    from spotflat.flats import prepare_flat
    from spotflat.pipeline import quantity_pair
    from spotflat.response import ResponseParams
    from spotflat.simulate import simulate_data

    rng = np.random.default_rng([seed, 12])  # the ring amplitude of calibrate_errors.realisation
    ring = float(10 ** rng.uniform(-4, -3))
    extra = {} if outlier_fraction is None else {"outlier_fraction": outlier_fraction}
    sim = simulate_data(DETECTOR, 50, seed, "none", response=ResponseParams(treering_amplitude=ring),
                        flat_level=50000.0, flux_weight="gaussian2", **extra)
    grids = grids_from_simulation(sim, DETECTOR)
    cal = build_calibration(grids)
    flat = prepare_flat(sim.flat, normalize="ccd", detector=DETECTOR, outliers=None)
    comp = compare_spots_flat(cal, grids, flat.data, detector=DETECTOR, gradient=False, clip=clip)
    comp.flat_electrons = flat_electrons(flat.levels, {"BUNIT": "electron"})
    a, b, _ = quantity_pair(comp, "flux")
    ok = np.isfinite(a) & np.isfinite(b)
    a0, b0 = np.where(ok, sim.t, np.nan), np.where(ok, sim.q, np.nan)
    ncols, nrows = comp.grids.grid_shape
    kw = dict(detector=comp.detector, x=comp.x, y=comp.y, grid_shape=(nrows, ncols), components=("amp",),
              spot_amp=comp.spot_amp_labels(), footprint_sigma=comp.footprint_sigma,
              footprint_radius=comp.footprint_radius, nboot=0, nnull=0, seed=seed)
    if seam is not None:  # the seam margin of the component fits (analyse_components' margins)
        kw["margins"] = (seam, 40.0, 50.0)
    row = {"seed": seed}
    pairs = {"tq": (a, b, comp.flat_electrons), "tq0": (a, b0, None), "t0q": (a0, b, comp.flat_electrons),
             "t0q0": (a0, b0, None)}
    for name, (aa, bb, el) in pairs.items():
        c = analyse_components(aa, bb, flat_electrons=el, **kw)[0][0]
        row.update({f"{name}_slope": c.slope, f"{name}_err": c.slope_err, f"{name}_raw": c.slope_raw,
                    f"{name}_lam": c.reliability})
    return row


def table(rows: list[dict]) -> None:
    print(f"{len(rows)} realisations")
    print("combo  mean slope   SD     RMS err  err/spread  median|z|/0.674")
    for name in COMBOS:
        sl = np.array([r[f"{name}_slope"] for r in rows])
        er = np.array([r[f"{name}_err"] for r in rows])
        sd, rms = np.nanstd(sl, ddof=1), np.sqrt(np.nanmean(er ** 2))
        z = (sl - 1.0) / er
        print(f"{name:5s}  {np.nanmean(sl):.4f}     {sd:.4f}  {rms:.4f}   {rms / sd:.2f}        "
              f"{np.nanmedian(np.abs(z)) / 0.674:.2f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("-n", type=int, default=80)
    r.add_argument("--first-seed", type=int, default=100)
    r.add_argument("-o", "--out", type=Path, required=True)
    r.add_argument("--no-clip", action="store_true")
    r.add_argument("--seam", type=float, default=None,
                   help="seam margin (px) of the component fits (default: analyse_components')")
    r.add_argument("--outlier-fraction", type=float, default=None,
                   help="the simulator's fraction of outlier points (default: its own, 0.003)")
    t = sub.add_parser("table")
    t.add_argument("files", nargs="+", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        rows, t0 = [], time.time()
        for seed in range(args.first_seed, args.first_seed + args.n):
            rows.append(realisation(seed, clip=not args.no_clip, outlier_fraction=args.outlier_fraction,
                                    seam=args.seam))
            np.save(args.out, np.array(rows, dtype=object), allow_pickle=True)
            print(f"{len(rows)}/{args.n} realisations, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    else:
        rows = [row for f in args.files for row in np.load(f, allow_pickle=True)]
        table(rows)


if __name__ == "__main__":
    main()
