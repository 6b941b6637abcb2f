"""QE or pixel area? A verdict per sensor and feature (tree rings, edge roll-off).

For each feature the flat shows, :mod:`spotflat.profiles` measures how much
of the flat's pattern the spots follow in flux (a QE variation: the flux
follows the flat, ``qe_fraction = 1``) and in centroid and size (a
pixel-area variation: the charge moves, the centroid follows the integral of
the flat and the size minus the flat; ``area_fraction = 1`` is the two
combined, inverse-variance weighted; each is also reported alone), while the
flux does not. The two fractions are
estimated independently, each with a bootstrap error over spots that also
carries the flat's own noise; they need not add to 1 (a flat that does not
describe the spots at all gives two zeros).

Verdict per feature:

* ``undetected`` -- the flat's own pattern is not significant (its
  excess power below ``min_snr``), or neither fraction is significant;
* ``qe`` -- only the flux follows (``qe_fraction`` above ``nsigma`` errors
  and above ``min_fraction``, 0.1: at high signal-to-noise a fraction of a
  per cent, e.g. a QE term not modelled exactly, is significant without
  being a second cause);
* ``area`` -- only the centroids follow;
* ``mixed`` -- both do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from astropy.table import Table

from .errors import InputError

__all__ = ["Verdict", "classify", "sensor_verdict", "correlate_hook", "FEATURES"]

FEATURES = ("treering", "edge")


def classify(qe: float, qe_err: float, area: float, area_err: float, flat_snr: float,
             nsigma: float = 3.0, min_snr: float = 5.0, min_fraction: float = 0.1) -> str:
    """The verdict for one feature from its two fractions (see the module notes)."""
    if not np.isfinite(flat_snr) or flat_snr < min_snr:
        return "undetected"
    q = np.isfinite(qe) and np.isfinite(qe_err) and qe > max(nsigma * qe_err, min_fraction)
    a = np.isfinite(area) and np.isfinite(area_err) and area > max(nsigma * area_err, min_fraction)
    return {(True, True): "mixed", (True, False): "qe", (False, True): "area"}.get((q, a), "undetected")


@dataclass
class Verdict:
    """The verdict table of one sensor and the profiles behind it.

    Attributes
    ----------
    table : astropy.table.Table
        One row per feature: ``feature``, ``qe_fraction``, ``qe_fraction_err``,
        ``area_fraction``, ``area_fraction_err``, ``verdict``, plus
        ``size_fraction`` (+ err, the size change along the flat's area
        prediction), ``flat_snr``, ``npoint``.
    profiles : dict
        ``feature -> RadialProfiles`` (missing when a feature could not be
        profiled, e.g. no spot near an edge).
    """

    table: Table
    profiles: dict = field(default_factory=dict, repr=False)

    def write(self, outdir, meta: dict | None = None) -> list:
        """Write ``verdict.ecsv`` and ``profiles.ecsv`` (tree-ring profiles) into ``outdir``."""
        from pathlib import Path

        from .fileio import atomic_path

        outdir = Path(outdir)
        files = []
        tables = [("verdict.ecsv", self.table)]
        if "treering" in self.profiles:
            tables.append(("profiles.ecsv", self.profiles["treering"].table()))
        if "edge" in self.profiles:
            tables.append(("edge_profiles.ecsv", self.profiles["edge"].table()))
        for name, tab in tables:
            tab = tab.copy()
            tab.meta.update({k: v for k, v in (meta or {}).items() if k not in tab.meta})
            with atomic_path(outdir / name) as tmp:
                tab.write(tmp, format="ascii.ecsv")
            files.append(outdir / name)
        return files


def _row(feature: str, prof, nsigma: float, min_snr: float) -> dict:
    nan = float("nan")
    if prof is None or not prof.amplitudes:
        return {"feature": feature, "qe_fraction": nan, "qe_fraction_err": nan, "area_fraction": nan,
                "area_fraction_err": nan, "centroid_fraction": nan, "centroid_fraction_err": nan,
                "size_fraction": nan, "size_fraction_err": nan,
                "flat_snr": nan, "npoint": 0, "verdict": "undetected"}
    qe, qe_e = prof.amplitudes["flux"]
    cen, cen_e = prof.amplitudes["radial_shift"]
    sz, sz_e = prof.amplitudes.get("size", (nan, nan))
    ar, ar_e = prof.amplitudes.get("area", (cen, cen_e))
    return {"feature": feature, "qe_fraction": qe, "qe_fraction_err": qe_e, "area_fraction": ar,
            "area_fraction_err": ar_e, "centroid_fraction": cen, "centroid_fraction_err": cen_e,
            "size_fraction": sz, "size_fraction_err": sz_e,
            "flat_snr": prof.flat_snr, "npoint": int(np.sum(prof.n)),
            "verdict": classify(qe, qe_e, ar, ar_e, prof.flat_snr, nsigma, min_snr)}


def sensor_verdict(grids, flat: np.ndarray, detector: str | None = None, *, used: np.ndarray | None = None,
                   centre: tuple[float, float] | None = None, nboot: int = 200, seed: int = 0,
                   nsigma: float = 3.0, min_snr: float = 5.0, t: np.ndarray | None = None) -> Verdict:
    """Profiles and verdict of one sensor's tree rings and edge roll-off.

    Parameters
    ----------
    grids : SpotGrids
        The spot data.
    flat : numpy.ndarray
        Normalised flat of the same detector.
    detector : str, optional
        Detector name: the tree-ring centre comes from the packaged imSim
        table (other detectors: fitted from the flat, see ``centre``).
    used : numpy.ndarray, optional
        Points to use (e.g. a calibration's kept points).
    centre : tuple of float or "fit", optional
        Override the tree-ring centre (CCD pixels), or ``"fit"``: fit it
        from the flat (:func:`spotflat.ringcentre.fit_treering_centre`).
        Default: the table's for known detectors, else fitted from the flat
        (no tree-ring row when the flat's gradients are not coherent
        enough, ``min_coherence``).
    nboot : int
        Bootstrap resamples.
    seed : int
    nsigma, min_snr : float
        Thresholds of :func:`classify`.
    t : numpy.ndarray, optional
        Relative throughput already computed (see
        :func:`spotflat.profiles.point_quantities`); default: refitted.

    Returns
    -------
    Verdict
    """
    from .profiles import edge_profiles, point_quantities, radial_profiles

    flat = np.asarray(flat, dtype=float)
    rng = np.random.default_rng(seed)
    pq = point_quantities(grids, flat, used, detector=detector, t=t)
    profs = {}
    c, source = _centre(centre, detector, flat)
    if c is not None:
        try:
            profs["treering"] = radial_profiles(grids, c, flat, used, nboot=nboot, seed=rng, points=pq)
        except InputError:
            pass
    try:
        profs["edge"] = edge_profiles(grids, flat.shape, flat, used, nboot=nboot, seed=rng, points=pq)
    except InputError:
        pass
    rows = [_row(f, profs.get(f), nsigma, min_snr) for f in FEATURES]
    table = Table(rows=rows)
    table.meta.update({"DETECTOR": detector or "", "NSIGMA": nsigma, "MINSNR": min_snr, "NBOOT": nboot,
                       "SEED": seed})
    if "treering" in profs:
        table.meta["TRCX"], table.meta["TRCY"] = (float(v) for v in profs["treering"].centre)
        table.meta["TRCSRC"] = source
    for col, text in (("qe_fraction", "flux amplitude along the flat's pattern (1 = QE-like)"),
                      ("area_fraction", "centroid and size amplitudes combined (1 = area-like)"),
                      ("centroid_fraction", "centroid amplitude along -integral(flat) (1 = area-like)"),
                      ("size_fraction", "size change along -flat (1 = area-like)")):
        table[col].description = text
    return Verdict(table=table, profiles=profs)


#: tiles' mean gradient coherence below which a flat shows no rings to fit a centre to (noise: ~0.1)
MIN_COHERENCE = 0.3


def _centre(centre, detector, flat):
    """``(centre, source)``: given, from the table, or fitted from the flat (None when not coherent)."""
    from .profiles import treering_centre

    if centre is not None and not isinstance(centre, str):
        return (float(centre[0]), float(centre[1])), "given"
    if centre not in (None, "fit", "table"):
        raise InputError(f"unknown tree-ring centre {centre!r}", expected="(x, y), 'fit' or 'table'")
    if centre != "fit":
        c = treering_centre(detector)
        if c is not None or centre == "table":
            return c, "table"
    from .ringcentre import fit_treering_centre

    try:
        fit = fit_treering_centre(flat, detector or None)
    except InputError:
        return None, "fit"
    return (fit.centre if fit.coherence >= MIN_COHERENCE else None), "fit"


def correlate_hook(comp, flat: np.ndarray, nboot: int = 200, seed: int = 0) -> Verdict | None:
    """The verdict for :func:`spotflat.pipeline.run_correlate` (None when it cannot be formed).

    Uses the comparison's spot data, its points (the calibration's kept
    ones), its relative throughput ``t`` (the calibration's ``F`` and ``s``:
    no second fit) and detector; a verdict that cannot be computed (too few points)
    is None rather than an error: the correlation results stand on their own.
    """
    used = np.isfinite(comp.t)
    try:
        return sensor_verdict(comp.grids, np.asarray(flat, float), comp.detector or None, used=used,
                              nboot=nboot, seed=seed, t=comp.t)
    except InputError:
        return None
