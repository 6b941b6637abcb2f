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

Then (unless ``--no-breakdown``) one in-process breakdown of (b): the
stage without its QE-vs-area verdict, the verdict
(:func:`spotflat.verdict.correlate_hook`) alone, the tables, and the
figures (matplotlib import, drawing, PNG writing) -- where the time goes.

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


_BREAKDOWN = """
import time
t0 = time.perf_counter()
import spotflat.verdict as verdict
from spotflat import pipeline
from spotflat.parallel import single_thread_blas
t1 = time.perf_counter()
hook, times = verdict.correlate_hook, {{}}
def timed(*a, **k):
    s = time.perf_counter(); out = hook(*a, **k); times["verdict"] = time.perf_counter() - s; return out
verdict.correlate_hook = timed  # pipeline imports it at call time
with single_thread_blas():
    res = pipeline.run_correlate({calib!r}, {flat!r})
t2 = time.perf_counter()
pipeline.write_outputs(res, {out!r}, figures=False)
t3 = time.perf_counter()
import matplotlib.figure
t4 = time.perf_counter()
from spotflat.figures import render_figures, write_figure_set
figs = render_figures(res)
t5 = time.perf_counter()
write_figure_set(figs, {out!r})
t6 = time.perf_counter()
v = times.get("verdict", float("nan"))
print(f"in-process breakdown: imports {{t1 - t0:.2f}} s, run_correlate {{t2 - t1:.2f}} s "
      f"(of which the QE-vs-area verdict {{v:.2f}} s), tables {{t3 - t2:.2f}} s, "
      f"figures: matplotlib import {{t4 - t3:.2f}} s, drawing {{t5 - t4:.2f}} s, "
      f"PNG writing {{t6 - t5:.2f}} s ({{len(figs)}} figures)")
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ndither", type=int, default=50)
    ap.add_argument("--no-breakdown", action="store_true", help="skip the in-process breakdown")
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
        if not args.no_breakdown:
            code = _BREAKDOWN.format(calib=str(tmp / "calib.fits"), flat=str(flat), out=str(tmp / "bd"))
            subprocess.run([os.environ.get("PYTHON", "python"), "-c", code], check=True, env=env)
    best = {k: min(v) for k, v in times.items()}
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    for k in times:
        print(f"{k:24s} best {best[k]:6.2f} s  median {med[k]:6.2f} s  ({', '.join(f'{t:.2f}' for t in times[k])})")
    for k in ("correlate", "correlate --no-figures"):
        print(f"{k} / calibrate: best {best[k] / best['calibrate']:.2f}x, median {med[k] / med['calibrate']:.2f}x"
              f"  (target <= 5)")


if __name__ == "__main__":
    main()
