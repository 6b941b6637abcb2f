"""``spotflat coords``: convert positions between amplifier, CCD, focal-plane and BOT frames."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import click
import numpy as np

__all__ = ["coords"]

_FRAMES = ("ccd", "focal", "amp", "bot")
_KEYS = ("detector", "amp", "amp_x", "amp_y", "ccd_x", "ccd_y", "focal_x", "focal_y", "bot_x", "bot_y")
_TO_COLUMNS = {
    "ccd": ("detector", "ccd_x", "ccd_y"),
    "focal": ("focal_x", "focal_y"),
    "amp": ("detector", "amp", "amp_x", "amp_y"),
    "bot": ("bot_x", "bot_y"),
}
_FROM_COLUMNS = {
    "ccd": ("detector", "ccd_x", "ccd_y"),
    "focal": ("focal_x", "focal_y"),
    "amp": ("detector", "amp", "amp_x", "amp_y"),
    "bot": ("bot_x", "bot_y"),
}


def _convert(frame: str, det, amps, x, y, convention) -> list[dict]:
    """All frames for points given in one frame (arrays); det: name or array of names/None."""
    from ..geometry import (amp_to_ccd, ccd_to_amp, ccd_to_focal, focal_to_ccd, focal_to_detector,
                            get_camera)
    from ..projector import bot_to_focal, focal_to_bot

    cam = get_camera()
    n = x.size
    dets = np.empty(n, dtype=object)
    dets[:] = det if isinstance(det, np.ndarray) else [det] * n
    out = {k: np.full(n, np.nan) for k in _KEYS if k not in ("detector", "amp")}
    amp_out = np.full(n, None, dtype=object)
    if frame in ("focal", "bot"):
        if frame == "bot":
            out["bot_x"], out["bot_y"] = x, y
            fx, fy = bot_to_focal(x, y, convention)
        else:
            fx, fy = x, y
        out["focal_x"], out["focal_y"] = fx, fy
        if dets[0] is None:
            names, cx, cy = focal_to_detector(fx, fy)
            dets[:] = names
        else:
            cx, cy = focal_to_ccd(dets[0], fx, fy)
        out["ccd_x"], out["ccd_y"] = cx, cy
    else:
        for name in dict.fromkeys(dets):
            if name is None:
                raise click.UsageError(f"--{frame} needs --detector (or a detector column in the file)")
            sel = dets == name
            if frame == "amp":
                cx = np.empty(sel.sum())
                cy = np.empty(sel.sum())
                for a in dict.fromkeys(amps[sel]):
                    s2 = amps[sel] == a
                    cx[s2], cy[s2] = amp_to_ccd(name, a, x[sel][s2], y[sel][s2])
            else:
                cx, cy = x[sel], y[sel]
            fx, fy = ccd_to_focal(name, cx, cy)  # checks the CCD range
            out["ccd_x"][sel], out["ccd_y"][sel] = cx, cy
            out["focal_x"][sel], out["focal_y"][sel] = fx, fy
    if frame != "bot":
        out["bot_x"], out["bot_y"] = focal_to_bot(out["focal_x"], out["focal_y"], convention)
    rows = []
    for i in range(n):
        name = dets[i]
        row = {"detector": None if name is None else cam.detector(name).name}
        ax = ay = math.nan
        if name is not None:
            d = cam.detector(name)
            cx, cy = out["ccd_x"][i], out["ccd_y"][i]
            if -0.5 <= cx < d.nx - 0.5 and -0.5 <= cy < d.ny - 0.5:
                amp_out[i], ax, ay = ccd_to_amp(d, cx, cy)
        row["amp"] = amp_out[i]
        row["amp_x"], row["amp_y"] = ax, ay
        for k in ("ccd_x", "ccd_y", "focal_x", "focal_y", "bot_x", "bot_y"):
            row[k] = float(out[k][i])
        if name is None:
            row["ccd_x"] = row["ccd_y"] = math.nan
        rows.append(row)
    return rows


def _num(tok: str) -> float | None:
    try:
        return float(tok)
    except ValueError:
        return None


def _read_points(path: Path, frame: str):
    """Points from a text file: ``[detector] [amp] x y`` per line (space or comma separated)."""
    from ..errors import InputError

    from ..fileio import check_readable, reading

    want = {"ccd": "[detector] x y", "amp": "[detector] amp x y", "focal": "x y", "bot": "x y"}[frame]
    check_readable(path, "a text file of points (--points)")
    if path.is_dir():
        raise InputError("is a directory", path=path, expected="a text file of points (--points)")
    dets, amps, xs, ys = [], [], [], []
    try:
        with reading(path, "a text file of points (--points)"):
            lines = path.read_text(encoding="utf-8").splitlines()
    except InputError:
        raise InputError("not a text file", path=path, expected=f"lines of '{want}' (--points)") from None
    first = True
    for lineno, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        toks = [t for t in re.split(r"[,\s]+", line) if t]
        if first and all(_num(t) is None for t in toks):
            first = False  # a header line
            continue
        first = False
        nums = [_num(t) for t in toks[-2:]]
        lead = toks[:-2]
        nlead = {"ccd": (0, 1), "amp": (1, 2), "focal": (0,), "bot": (0,)}[frame]
        if len(toks) < 2 or None in nums or len(lead) not in nlead:
            raise InputError(f"line {lineno}: cannot read {line!r}", path=path,
                             expected=f"'{want}' for --from {frame}")
        if not all(math.isfinite(v) for v in nums):
            raise InputError(f"line {lineno}: position {line!r} is not finite", path=path,
                             expected="finite numbers (no nan or inf)")
        det = lead[0] if (frame == "ccd" and lead) or (frame == "amp" and len(lead) == 2) else None
        dets.append(det)
        amps.append(lead[-1] if frame == "amp" else None)
        xs.append(nums[0])
        ys.append(nums[1])
    if not xs:
        raise InputError("no points in the file", path=path, expected=f"lines of '{want}'")
    return dets, amps, xs, ys


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def _jsonable(row: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


@click.command()
@click.option("--detector", "-d", default=None, help="Detector, e.g. R22_S11 (needed for --ccd and --amp).")
@click.option("--ccd", "ccd_pts", type=(float, float), multiple=True, metavar="X Y",
              help="DM CCD pixel (repeatable).")
@click.option("--focal", "focal_pts", type=(float, float), multiple=True, metavar="X Y",
              help="DM focal-plane position, mm (repeatable).")
@click.option("--amp", "amp_pts", type=(str, float, float), multiple=True, metavar="AMP X Y",
              help="Amplifier (C00..C17) and trimmed amplifier pixel (repeatable).")
@click.option("--bot", "bot_pts", type=(float, float), multiple=True, metavar="X Y",
              help="Test-stand projector position BOTXCAM BOTYCAM (or file-name x y), mm (repeatable).")
@click.option("--points", "points_file", type=click.Path(path_type=Path), default=None,
              help="Text file of points, one a line: 'x y', '[detector] x y' (--from ccd) or "
                   "'[detector] amp x y' (--from amp); '#' starts a comment.")
@click.option("--from", "from_frame", type=click.Choice(_FRAMES), default=None,
              help="Frame of the points in --points.")
@click.option("--to", "to_frame", type=click.Choice(_FRAMES + ("all",)), default="all",
              show_default=True, help="Frame(s) to show in the table (--json always has every frame).")
@click.option("--convention", default=None,
              help="BOT convention: 'ccs' (default: focal_x = bot_y, focal_y = bot_x), 'dm' "
                   "(focal = bot) or a spec like 'y,-x'.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON list of objects (detector, amp, ccd_x, ccd_y, focal_x, focal_y, ...).")
def coords(detector, ccd_pts, focal_pts, amp_pts, bot_pts, points_file, from_frame, to_frame,
           convention, as_json) -> None:
    """Convert positions between amplifier, CCD, focal-plane and BOT frames.

    \b
    Examples:
      spotflat coords --detector R22_S11 --ccd 100 200 --to focal
      spotflat coords --focal 12.3 -45.6 --to ccd
      spotflat coords --detector R22_S11 --amp C10 5 5 --to ccd
      spotflat coords --bot -296.5 41.7 --to ccd --json
      spotflat coords --points spots.txt --from focal --json

    CCD pixels are DM pixels (0, 0 = centre of the lower-left pixel), the focal
    plane is DM FOCAL_PLANE in mm. Points in a gap between CCDs have no
    detector (null in --json).
    """
    from ..errors import InputError
    from ..geometry import get_camera
    from ..projector import get_convention

    conv = get_convention(convention)
    det = get_camera().detector(detector).name if detector else None
    if points_file is not None and from_frame is None:
        raise click.UsageError("--points needs --from (ccd, focal, amp or bot)")
    if from_frame is not None and points_file is None:
        raise click.UsageError("--from goes with --points")
    groups = []
    for frame, pts in (("ccd", ccd_pts), ("focal", focal_pts), ("bot", bot_pts)):
        if pts:
            arr = np.array(pts, dtype=float)
            groups.append((frame, det, None, arr[:, 0], arr[:, 1]))
    if amp_pts:
        groups.append(("amp", det, np.array([a for a, _, _ in amp_pts], dtype=object),
                       np.array([p[1] for p in amp_pts]), np.array([p[2] for p in amp_pts])))
    if points_file is not None:
        dets, amps, xs, ys = _read_points(points_file, from_frame)
        if from_frame in ("ccd", "amp"):
            names = np.array([d if d is not None else det for d in dets], dtype=object)
        else:
            names = det
        groups.append((from_frame, names, np.array(amps, dtype=object), np.array(xs), np.array(ys)))
    if not groups:
        raise click.UsageError("give a position: --ccd X Y, --focal X Y, --amp AMP X Y, --bot X Y "
                               "or --points FILE --from FRAME")
    for frame, _, _, x, y in groups:
        bad = ~(np.isfinite(x) & np.isfinite(y))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise click.BadParameter(f"position ({x[i]:g}, {y[i]:g}) is not finite; expected finite numbers "
                                     "(no nan or inf)", param_hint=f"--{frame}")
    rows, inputs = [], []
    for frame, names, amps, x, y in groups:  # compute everything before printing anything
        try:
            rows += _convert(frame, names, amps, x, y, conv)
        except InputError as exc:
            expected = (exc.expected or "").split(", or check=False")[0] or None
            raise InputError(f"--{frame}: {exc.problem}", path=exc.path, expected=expected) from None
        inputs += [frame] * x.size
    if as_json:
        click.echo(json.dumps([_jsonable(r) for r in rows], indent=1))
        return
    for frame in dict.fromkeys(inputs):
        cols = list(_FROM_COLUMNS[frame])
        targets = _FRAMES if to_frame == "all" else (to_frame,)
        for t in targets:
            cols += [c for c in _TO_COLUMNS[t] if c not in cols]
        sel = [r for r, f in zip(rows, inputs) if f == frame]
        table = [cols] + [[_fmt(r[c]) for c in cols] for r in sel]
        widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
        if len(dict.fromkeys(inputs)) > 1:
            click.echo(f"from {frame}:")
        for row in table:
            click.echo("  ".join(v.rjust(w) for v, w in zip(row, widths)).rstrip())
        off = [r for r in sel if r["detector"] is None]
        if off:
            click.echo(f"{len(off)} point(s) fall in a gap or off the camera (detector '-').", err=True)
    if "bot" in inputs or to_frame in ("bot", "all"):
        click.echo(f"BOT convention '{conv.name}': {conv.describe()}", err=True)
