"""Monte Carlo: does the point rejection keep amplifier seams? (issue 12 item 6 / issue 13 item 4)

Simulated E2V runs (written here, not with spotflat.simulate): 25 x 25 spots
150 px apart, dithers over +-300 px, 2 % rms gain steps between the 16
amplifiers, 0.3 % noise, 0.2 % of points +-50 % outliers. For each seed, the
rejected fraction of points within 5 px of a seam against elsewhere, with
the default estimator (local expectation, segments of the detector) and with
the spot's expectation ``F s`` alone, and the fraction of outliers caught.

Usage::

    python benchmarks/seam_rejection.py --seeds 20 --nexp 200
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_calibration import _seam_run  # noqa: E402  (the generator the test uses)

from spotflat.calibration import _segment, estimate_scales  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--nexp", type=int, default=200)
    args = ap.parse_args()
    rows = []
    for seed in range(args.seeds):
        f, x, y, dseam, inside, bad = _seam_run(seed, args.nexp)
        near, far = inside & (dseam < 5), inside & (dseam >= 5)
        out = []
        for kw in (dict(x=x, y=y, segment=_segment("R22_S11")), {}):
            _, _, used, _, ok = estimate_scales(f, **kw)
            rn, rf = 1 - used[near].mean(), 1 - used[far].mean()
            good_near = (near & ~bad & ~used).sum() / (near & ~bad).sum()
            good_far = (far & ~bad & ~used).sum() / (far & ~bad).sum()
            out += [rn / rf, good_near, good_far, 1 - used[bad].mean(), ok]
        rows.append(out)
        print(f"seed {seed:3d}: local ratio {out[0]:.2f} (good points rejected near {out[1]:.4%}, "
              f"elsewhere {out[2]:.4%}, outliers caught {out[3]:.3f}) | F s only ratio {out[5]:.2f} "
              f"(good near {out[6]:.3%}, elsewhere {out[7]:.3%})")
    a = np.array(rows, dtype=float)
    print(f"local expectation: ratio median {np.median(a[:, 0]):.2f}, max {a[:, 0].max():.2f}, "
          f"<= 2 in {np.mean(a[:, 0] <= 2):.0%} of seeds; outliers caught {a[:, 3].min():.3f} (worst)")
    print(f"F s only         : ratio median {np.median(a[:, 5]):.2f}, max {a[:, 5].max():.2f}")


if __name__ == "__main__":
    main()
