#!/usr/bin/env python
"""Regenerate spotflat's packaged LSSTCam geometry table from obs_lsst policy files.

The table (``src/spotflat/data/lsstcam_geometry.json``) holds the facts
spotflat needs about the camera -- raft offsets and yaw, CCD offsets and yaw
within each raft, the CCD type (and so vendor) of each raft, the amplifier
layout and read-out flips, the raw segment layout (prescan, data, overscan),
``refpos`` and the pixel size -- so that the package never needs the LSST
stack. It follows obs_lsst's ``generateCamera.py``: a CCD's focal-plane
offset is ``raft_offset + R(raft_yaw) @ (layout_offset + geometryWithinRaft
offset)`` and its yaw is ``geometryWithinRaft yaw + raft_yaw``; the ``R00W``
style wavefront rafts are folded into their raft (``R00_SW0``).

Usage::

    python scripts/make_geometry_table.py [POLICY_DIR] [-o OUTPUT] [--check]

``POLICY_DIR`` defaults to ``../shared/data/real/obs_lsst/policy`` relative to
the repository root; ``--check`` compares with the packaged file instead of
writing it (exit status 1 when they differ). Needs PyYAML.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_POLICY = ROOT.parent / "shared" / "data" / "real" / "obs_lsst" / "policy"
DEFAULT_OUTPUT = ROOT / "src" / "spotflat" / "data" / "lsstcam_geometry.json"

#: Corner-raft aliases that obs_lsst folds into the real raft name.
RAFT_ALIASES = {"R00W": "R00", "R04W": "R04", "R40W": "R40", "R44W": "R44"}
#: Vendor of each CCD type used by LSSTCam.
VENDORS = {"ITL": "ITL", "E2V": "E2V", "ITL_G": "ITL", "ITL_WF": "ITL"}
#: What each CCD type is for.
KINDS = {"ITL": "science", "E2V": "science", "ITL_G": "guider", "ITL_WF": "wavefront"}


def _load_yaml(path: Path) -> dict:
    import yaml  # only the generator needs PyYAML

    with open(path) as fh:
        return yaml.safe_load(fh)


def _bbox(box) -> list[int]:
    """``[[x0, y0], [nx, ny]]`` -> ``[x0, y0, nx, ny]`` (ints)."""
    (x0, y0), (nx, ny) = box
    return [int(x0), int(y0), int(nx), int(ny)]


def _rotate(offset, yaw_deg: float) -> list[float]:
    # exact for the multiples of 90 degrees the corner rafts use
    q = yaw_deg / 90.0
    if q == int(q):
        c, s = [(1, 0), (0, 1), (-1, 0), (0, -1)][int(q) % 4]
    else:
        c, s = math.cos(math.radians(yaw_deg)), math.sin(math.radians(yaw_deg))
    x, y = float(offset[0]), float(offset[1])
    return [c * x - s * y + 0.0, s * x + c * y + 0.0]


def _ccd_type(header: dict, type_name: str) -> dict:
    ccd = header[f"CCD_{type_name}"]
    amps = ccd["amplifiers"]
    first = next(iter(amps.values()))
    nx = int(ccd["bbox"][1][0]) + 1
    ny = int(ccd["bbox"][1][1]) + 1
    raw = {
        "raw_size": [int(v) for v in first["rawBBox"][1]],
        "data": _bbox(first["rawDataBBox"]),
        "serial_prescan": _bbox(first["rawSerialPrescanBBox"]),
        "serial_overscan": _bbox(first["rawSerialOverscanBBox"]),
        "parallel_overscan": _bbox(first["rawParallelOverscanBBox"]),
    }
    amp_rows = []
    for name, amp in amps.items():  # the policy order is the raw file's HDU order
        for key in ("rawBBox", "rawDataBBox", "rawSerialPrescanBBox",
                    "rawSerialOverscanBBox", "rawParallelOverscanBBox"):
            if _bbox(amp[key]) != _bbox(first[key]):
                raise ValueError(f"CCD_{type_name} {name}: {key} differs between amplifiers")
        fx, fy = (bool(v) for v in amp["flipXY"])
        ix, iy = (int(v) for v in amp["ixy"])
        amp_rows.append([name, int(amp["hdu"]), ix, iy, int(fx), int(fy)])
    return {
        "vendor": VENDORS[type_name],
        "kind": KINDS[type_name],
        "nx": nx,
        "ny": ny,
        "refpos": [float(v) for v in ccd["refpos"]],
        "pixel_size": [float(v) for v in ccd["pixelSize"]],
        **raw,
        "amp_columns": ["name", "hdu", "ix", "iy", "flip_x", "flip_y"],
        "amps": amp_rows,
    }


def build_table(policy_dir: str | os.PathLike) -> dict:
    """Build the geometry table (a JSON-able dict) from an obs_lsst policy folder.

    Parameters
    ----------
    policy_dir : str or os.PathLike
        Folder holding ``cameraHeader.yaml``, ``rafts.yaml`` and ``lsstCam/R*.yaml``.

    Returns
    -------
    dict
        The table, as written to ``lsstcam_geometry.json``.
    """
    policy_dir = Path(policy_dir)
    header = _load_yaml(policy_dir / "cameraHeader.yaml")
    rafts = _load_yaml(policy_dir / "rafts.yaml")["rafts"]

    ccd_types: dict[str, dict] = {}
    raft_rows: dict[str, dict] = {}
    det_rows = []
    for raft_file_name, raft in rafts.items():
        path = policy_dir / "lsstCam" / f"{raft_file_name}.yaml"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no CCD description for raft {raft_file_name}")
        raft_data = _load_yaml(path)[raft_file_name]
        type_name = raft_data["detectorType"]
        if type_name not in ccd_types:
            ccd_types[type_name] = _ccd_type(header, type_name)
        layout = header[f"RAFT_{type_name}"]["ccds"]
        raft_name = RAFT_ALIASES.get(raft_file_name, raft_file_name)
        raft_offset = [float(v) for v in raft["offset"]]
        raft_yaw = float(raft.get("yaw", 0.0))
        raft_rows.setdefault(raft_name, {"offset": raft_offset, "yaw": raft_yaw, "types": []})
        raft_rows[raft_name]["types"].append(type_name)
        within = raft_data.get("geometryWithinRaft", {}) or {}
        for sensor in raft_data["ccdSerials"]:
            lay = layout[sensor]
            doff = within.get(sensor, {}).get("offset", [0.0, 0.0])[:2]
            dyaw = within.get(sensor, {}).get("yaw")
            # obs_lsst leaves the CCD's own yaw (0) when geometryWithinRaft is silent
            yaw = 0.0 if dyaw is None else float(dyaw) + raft_yaw
            local = [float(lay["offset"][0]) + float(doff[0]), float(lay["offset"][1]) + float(doff[1])]
            rot = _rotate(local, raft_yaw)
            offset = [round(rot[0] + raft_offset[0], 10), round(rot[1] + raft_offset[1], 10)]
            det_rows.append([
                f"{raft_name}_{sensor}", int(raft["id0"]) + int(lay["id"]), raft_name, sensor,
                type_name, str(raft_data["ccdSerials"][sensor]), offset[0], offset[1],
                yaw % 360.0, [float(v) for v in lay["offset"]], [float(v) for v in doff],
            ])
    det_rows.sort(key=lambda r: r[1])
    return {
        "description": "LSSTCam geometry for spotflat, generated from lsst/obs_lsst policy "
                       "files (GPL-3.0) by scripts/make_geometry_table.py; do not edit by hand.",
        "focal_plane": "DM FOCAL_PLANE, mm; pixel -> focal: offset + R(yaw) @ ((pix - refpos) * pixel_size)",
        "ccd_types": ccd_types,
        "rafts": raft_rows,
        "detector_columns": ["name", "id", "raft", "sensor", "type", "serial", "offset_x",
                             "offset_y", "yaw", "layout_offset", "within_raft_offset"],
        "detectors": det_rows,
    }


def dumps(table: dict) -> str:
    """Serialise the table compactly: dicts indented, one line per row of a list."""
    return _fmt(table, 0) + "\n"


def _fmt(obj, level: int) -> str:
    pad, inner = " " * level, " " * (level + 1)
    if isinstance(obj, dict):
        items = [f"{inner}{json.dumps(k)}: {_fmt(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(v, list) and any(isinstance(w, list) for w in v)
                                     or isinstance(v, dict) for v in obj):
        rows = [f"{inner}{json.dumps(v)}" for v in obj]
        return "[\n" + ",\n".join(rows) + "\n" + pad + "]"
    if isinstance(obj, list) and obj and all(isinstance(v, list) for v in obj):
        rows = [f"{inner}{json.dumps(v)}" for v in obj]
        return "[\n" + ",\n".join(rows) + "\n" + pad + "]"
    return json.dumps(obj)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("policy_dir", nargs="?", default=str(DEFAULT_POLICY),
                        help="obs_lsst policy folder (default: %(default)s)")
    parser.add_argument("-o", "--output", default=str(DEFAULT_OUTPUT),
                        help="table to write (default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="compare with OUTPUT instead of writing it")
    args = parser.parse_args(argv)
    if not Path(args.policy_dir).is_dir():
        print(f"{args.policy_dir}: no such policy folder", file=sys.stderr)
        return 1
    text = dumps(build_table(args.policy_dir))
    if args.check:
        same = Path(args.output).exists() and json.loads(Path(args.output).read_text()) == json.loads(text)
        print(f"{args.output}: {'up to date' if same else 'DIFFERS from the policy files'}")
        return 0 if same else 1
    tmp = Path(args.output).with_suffix(".json.tmp")
    tmp.write_text(text)
    os.replace(tmp, args.output)
    print(f"wrote {args.output} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
