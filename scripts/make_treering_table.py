"""Build ``src/spotflat/data/treerings_imsim.json`` from imSim's tree-ring parameter file.

The source is ``tree_ring_parameters_2026-04-02.txt`` from LSSTDESC/imSim
(``data/tree_ring_data``, BSD-3-Clause), copied to
``../shared/data/real/imsim/``. Each block gives, for one science CCD, the
raft/sensor indices, the ring centre ``Cx, Cy`` (relative to pixel
``2048.5, 2048.5`` in imSim/GalSim's 1-based image coordinates), the
amplitude terms ``A, B`` and 20 cosine and 20 sine radial frequencies
(pixels) with phases. The table keeps these numbers unchanged plus the
centre converted to the DM convention (``x_DM = Cx + 2048.5 - 1``).

Run: ``python scripts/make_treering_table.py [SOURCE] [OUTPUT]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "real" / "imsim" / "tree_ring_parameters_2026-04-02.txt"
DEFAULT_OUTPUT = ROOT / "src" / "spotflat" / "data" / "treerings_imsim.json"
NFREQ = 20


def parse(path: Path) -> dict:
    """Parse the imSim parameter file into ``{detector: {...}}``."""
    lines = path.read_text().splitlines()
    block = NFREQ + 3
    out = {}
    for i in range(0, len(lines) - block + 1, block):
        items = lines[i + 1].split()
        det = "R%s%s_S%s%s" % tuple(items[:4])
        freqs = [[float(v) for v in line.split()] for line in lines[i + 3:i + block]]
        cx, cy = float(items[4]), float(items[5])
        out[det] = {"cx_imsim": cx, "cy_imsim": cy, "x_dm": cx + 2047.5, "y_dm": cy + 2047.5,
                    "A": float(items[6]), "B": float(items[7]),
                    "cos_freq": [f[0] for f in freqs], "cos_phase": [f[1] for f in freqs],
                    "sin_freq": [f[2] for f in freqs], "sin_phase": [f[3] for f in freqs]}
    return out


def main(argv: list[str]) -> None:
    src = Path(argv[1]) if len(argv) > 1 else DEFAULT_SOURCE
    dst = Path(argv[2]) if len(argv) > 2 else DEFAULT_OUTPUT
    table = {"source": f"LSSTDESC/imSim data/tree_ring_data/{src.name} (BSD-3-Clause)",
             "model": "displacement f(r) = 0.01 (A + B r^4) sum_j [sin(2 pi r / c_j + cp_j) c_j / 2 pi"
                      " - cos(2 pi r / s_j + sp_j) s_j / 2 pi], pixels",
             "detectors": parse(src)}
    dst.write_text(json.dumps(table, indent=0, sort_keys=True))
    print(f"wrote {len(table['detectors'])} detectors to {dst}")


if __name__ == "__main__":
    main(sys.argv)
