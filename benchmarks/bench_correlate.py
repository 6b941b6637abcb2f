"""``spotflat correlate`` at its defaults against ``spotflat calibrate`` on the same data.

Simulates one 50-dither run of R22_S11 (``spotflat simulate``'s defaults),
then times, each as a whole fresh process (interpreter start, imports,
reading, writing -- what a user waits for):

(a) ``spotflat calibrate SPOTDATA -o calib.fits -q``
(b) ``spotflat correlate calib.fits --flat FLAT -o out -q`` at its defaults
    (1000 bootstrap + 1000 null resamples per component, the three
    components all/amp/within, figures written)
(c) the same with ``--no-figures``

``--repeat`` runs of each, interleaved; the ratio uses the best time of
each (load from other jobs only slows a run down) and the medians are
printed too. Target: (b)/(a) <= 5.

Usage::

    python benchmarks/bench_correlate.py --repeat 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


def _time(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ndither", type=int, default=50)
    args = ap.parse_args(argv)
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    exe = [shutil.which("spotflat") or "spotflat"]  # the console script, as users run it
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(exe + ["simulate", str(tmp / "sim"), "--ndither", str(args.ndither), "-q"], check=True,
                       env=env, stdout=subprocess.DEVNULL)
        flat = next((tmp / "sim" / "flat").iterdir())
        cal = exe + ["calibrate", str(tmp / "sim" / "spotdata"), "-o", str(tmp / "calib.fits"), "-q"]
        subprocess.run(cal, check=True, env=env, stdout=subprocess.DEVNULL)
        cor = exe + ["correlate", str(tmp / "calib.fits"), "--flat", str(flat), "-o", str(tmp / "out"), "-q"]
        times = {"calibrate": [], "correlate": [], "correlate --no-figures": []}
        for _ in range(args.repeat):
            times["calibrate"].append(_time(cal, env))
            times["correlate"].append(_time(cor, env))
            times["correlate --no-figures"].append(_time(cor + ["--no-figures"], env))
    best = {k: min(v) for k, v in times.items()}
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    for k in times:
        print(f"{k:24s} best {best[k]:6.2f} s  median {med[k]:6.2f} s  ({', '.join(f'{t:.2f}' for t in times[k])})")
    for k in ("correlate", "correlate --no-figures"):
        print(f"{k} / calibrate: best {best[k] / best['calibrate']:.2f}x, median {med[k] / med['calibrate']:.2f}x"
              f"  (target <= 5)")


if __name__ == "__main__":
    main()
