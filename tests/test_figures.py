"""The figures a user sees: produced, non-empty, and readable without guessing.

The figure functions return :class:`matplotlib.figure.Figure` objects, so the
checks inspect axes, labels, colour bars and tick-label boxes rather than
pixels. One small demo run (8 dithers, few resamples) feeds them all.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from spotflat import plots
from spotflat.figures import FIGURE_NAMES, MANIFEST, render_figures, spotflat_figures, write_figure_set
from spotflat.mapbins import choose_map_bin, map_noise

DEMO_FIGURES = {"spot_flux_map.png", "t_map.png", "q_map.png", "residual_map.png", "t_vs_q.png",
                "residual_hist.png", "amp_residuals.png", "residual_vs_boundary.png", "mismatch_recovery.png",
                "dx_vs_dqdx.png", "dy_vs_dqdy.png", "size_vs_lapq.png"}
UNIT = re.compile(r"\[[^\]]+\]")
#: axes whose labels name categories or counts, not physical quantities
CATEGORICAL = ("amplifier",)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from spotflat.cli.demo import run_demo

    out = tmp_path_factory.mktemp("demo") / "run"
    return run_demo(out, ndither=8, nboot=20, nnull=20, quiet=True), out


@pytest.fixture(scope="module")
def figures(demo):
    return render_figures(demo[0]["result"])


def _mappables(ax):
    return [m for m in list(ax.images) + list(ax.collections)
            if getattr(m, "get_array", None) is not None and m.get_array() is not None
            and getattr(m, "colorbar", None) is not None]


def _is_colorbar(ax) -> bool:
    return getattr(ax, "_colorbar", None) is not None


def _overlaps(labels, renderer) -> list[tuple[str, str]]:
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in labels if t.get_visible() and t.get_text()]
    bad = []
    for (ta, a), (tb, b) in zip(boxes, boxes[1:]):
        if a.overlaps(b):
            bad.append((ta, tb))
    return bad


def check_figure(name: str, fig: Figure) -> None:
    """Title, labelled axes with units, labelled colour bars, no overlapping tick labels."""
    assert isinstance(fig, Figure), name
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    axes = [ax for ax in fig.axes if not _is_colorbar(ax)]
    assert axes, name
    assert any(ax.get_title() for ax in axes), f"{name}: no title"
    for ax in axes:
        assert ax.has_data(), f"{name}: empty axes"
        ylabel = ax.get_ylabel()
        assert ylabel and UNIT.search(ylabel), f"{name}: y label {ylabel!r} has no unit"
        xlabel = ax.get_xlabel()
        shared = [o for o in axes if o is not ax and o.get_shared_x_axes().joined(ax, o)]
        if xlabel or not shared:  # the top panel of a shared-x pair carries no x label
            assert xlabel, f"{name}: no x label"
            assert UNIT.search(xlabel) or xlabel in CATEGORICAL, f"{name}: x label {xlabel!r} has no unit"
        for m in _mappables(ax):
            label = m.colorbar.ax.get_ylabel() or m.colorbar.ax.get_xlabel()
            assert label and UNIT.search(label), f"{name}: colour bar label {label!r} has no unit"
        for axis in (ax.xaxis, ax.yaxis):
            assert not _overlaps(axis.get_ticklabels(), renderer), f"{name}: overlapping tick labels"
    for cax in fig.axes:
        if _is_colorbar(cax):
            for axis in (cax.xaxis, cax.yaxis):
                assert not _overlaps(axis.get_ticklabels(), renderer), f"{name}: overlapping colour-bar ticks"
    # one y axis per panel: no twin axes sharing a position
    boxes = [tuple(np.round(ax.get_position().bounds, 3)) for ax in axes]
    assert len(boxes) == len(set(boxes)), f"{name}: twin axes"


def test_every_demo_figure_is_written(demo):
    out, outdir = demo
    pngs = {p.name for p in outdir.glob("*.png")}
    assert pngs == DEMO_FIGURES
    assert all((outdir / n).stat().st_size > 10_000 for n in pngs)
    assert set((outdir / MANIFEST).read_text().split()) == DEMO_FIGURES
    assert not list(outdir.glob(".spotflat-figures-*")), "staging folder left behind"


def test_every_figure_reads_without_guessing(figures):
    assert set(figures) == DEMO_FIGURES - {"mismatch_recovery.png"}
    for name, fig in figures.items():
        check_figure(name, fig)


def test_recovery_figure(demo):
    from spotflat.cli.demo import _recovery_figure
    from spotflat.compare import normalise_like_t

    out = demo[0]
    comp = out["result"].comparison
    ok = comp.valid & np.isfinite(out["sim"].mismatch)
    inj = np.where(ok, normalise_like_t(out["sim"].mismatch, ok) - 1, np.nan)
    fig = _recovery_figure(comp, inj, out["r_recovered"])
    check_figure("mismatch_recovery.png", fig)
    # both panels on one colour scale, so the pattern compares by eye
    ims = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(ims) == 2 and ims[0].get_clim() == ims[1].get_clim()


def _texts(fig) -> str:
    out = []
    for ax in fig.axes:
        out += [t.get_text() for t in ax.texts]
        leg = ax.get_legend()
        if leg is not None:
            out += [t.get_text() for t in leg.get_texts()] + [leg.get_title().get_text()]
    return "\n".join(out)


def test_relations_state_their_expectations(figures):
    t_vs_q = _texts(figures["t_vs_q.png"])
    assert "slope 1" in t_vs_q and "slope 0" in t_vs_q
    dx = _texts(figures["dx_vs_dqdx.png"])
    assert "flat describes" not in dx and "pix²" in dx and "no fixed value" in dx
    size = _texts(figures["size_vs_lapq.png"])  # against the Laplacian: QE slope (xx + yy) / 4, area larger
    assert "QE" in size and "pix²" in size and "(P/2π)²" in size
    for name in ("t_vs_q.png", "dx_vs_dqdx.png", "dy_vs_dqdy.png", "size_vs_lapq.png"):
        fig = figures[name]
        ax = fig.axes[0]
        text = _texts(fig)
        m = re.search(r"(\d+) of (\d+) points .* outside the axes", text)
        assert m, name
        nout, ntot = int(m.group(1)), int(m.group(2))
        assert ntot > 1000 and nout < 0.05 * ntot, name  # limits show the cloud, not a clipped core
        # binned means with error bars over the cloud
        assert any(c.__class__.__name__ == "ErrorbarContainer" for c in ax.containers), name


def test_residual_map_states_noise_and_signal(figures):
    ax = figures["residual_map.png"].axes[0]
    note = " ".join(t.get_text() for t in ax.texts)
    assert "per-bin noise" in note and "signal rms" in note
    assert re.search(r"\d+-px bins", note)


def test_boundary_profile_one_axis_per_quantity_zero_based(figures):
    fig = figures["residual_vs_boundary.png"]
    axes = [ax for ax in fig.axes if not _is_colorbar(ax)]
    assert len(axes) == 2
    rms_ax = axes[1]
    assert rms_ax.get_ylim()[0] == 0
    assert all(ax.containers for ax in axes)  # error bars on both


def test_map_noise_measures_the_noise_it_is_given():
    """Pure noise: the split-half noise matches the truth and nothing is 'detected'."""
    rng = np.random.default_rng(11)
    nspot, nexp, sigma = 900, 20, 2e-3
    cx, cy = np.meshgrid(np.arange(30) * 64 + 40, np.arange(30) * 64 + 40)
    x = cx.ravel()[:, None] + rng.uniform(-32, 32, (nspot, nexp))
    y = cy.ravel()[:, None] + rng.uniform(-32, 32, (nspot, nexp))
    v = rng.normal(0, sigma, (nspot, nexp))
    v -= v.mean(axis=1, keepdims=True)  # relative to each spot's mean, like d
    v[3, 4] = 0.5  # one stray outlier must not count as structure
    for b in (24, 32, 64):
        m = map_noise(x, y, v, (2000, 2000), b)
        # the truth: the scatter of this pure-noise map, per point (the per-spot
        # normalisation makes it smaller than sigma when a bin covers a spot's dithers)
        u = m.count >= 2
        z = m.map[u] * np.sqrt(m.count[u])
        actual = 1.4826 * np.median(np.abs(z - np.median(z)))  # robust: the outlier is in one bin
        assert m.point_noise == pytest.approx(actual, rel=0.2), b
    c = choose_map_bin(x, y, v, (2000, 2000))
    assert not c.detectable and c.significance < 5
    assert "noise-dominated" in c.describe(1e6, "ppm")


@pytest.mark.parametrize("period", [120, 250])
def test_choose_map_bin_shows_a_ring_pattern(period):
    """Rings at 1e-3 under 1e-3 noise per point: detected, and the chosen map follows them."""
    rng = np.random.default_rng(period)
    nspot, nexp, pitch = 900, 30, 65.3
    cx, cy = np.meshgrid(np.arange(30) * pitch + 40, np.arange(30) * pitch + 40)
    x = cx.ravel()[:, None] + rng.uniform(-pitch / 2, pitch / 2, (nspot, nexp))
    y = cy.ravel()[:, None] + rng.uniform(-pitch / 2, pitch / 2, (nspot, nexp))
    ring = 1e-3 * np.sin(2 * np.pi * np.hypot(x + 500, y + 300) / period)
    ring -= ring.mean(axis=1, keepdims=True)  # what survives the per-spot normalisation
    v = ring + rng.normal(0, 1e-3, x.shape)
    v -= v.mean(axis=1, keepdims=True)
    c = choose_map_bin(x, y, v, (2000, 2000))
    assert c.detectable and c.significance > 5
    snr = {b: s / n for b, (s, n, _) in c.tried.items() if n > 0}
    assert c.signal_rms / c.noise >= 0.8 * max(snr.values()) - 1e-9
    truth = map_noise(x, y, ring, (2000, 2000), c.bin)
    u = c.count >= 2
    assert np.corrcoef(c.map[u], truth.map[u])[0, 1] > 0.6
    # the measured signal is the rms of the binned truth, within the noise
    assert c.signal_rms == pytest.approx(np.std(truth.map[u]), rel=0.3)


def test_stale_figures_removed_user_files_kept(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    for name in ("xy_vs_q.png", "t_vs_q.png", "my_plot.png", "old_spotflat.png"):
        (out / name).write_bytes(b"old")
    (out / MANIFEST).write_text("old_spotflat.png\n../outside.png\n")
    (tmp_path / "outside.png").write_bytes(b"keep")
    fig, ax = plots.new_axes()
    ax.plot([0, 1], [0, 1])
    files = write_figure_set({"t_vs_q.png": fig}, out)
    assert [p.name for p in files] == ["t_vs_q.png"]
    assert sorted(p.name for p in files.removed) == ["old_spotflat.png", "xy_vs_q.png"]
    assert sorted(p.name for p in out.glob("*.png")) == ["my_plot.png", "t_vs_q.png"]
    assert (out / "t_vs_q.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "outside.png").exists()
    assert [p.name for p in spotflat_figures(out)] == ["t_vs_q.png"]


def test_failed_figure_leaves_the_folder_as_it_was(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "q_map.png").write_bytes(b"earlier run")
    good, ax = plots.new_axes()
    ax.plot([0, 1])
    bad, ax = plots.new_axes()
    ax.text(0, 0, "$\\unknowncommand$")  # mathtext error at save time
    with pytest.raises(ValueError):
        write_figure_set({"t_vs_q.png": good, "t_map.png": bad}, out)
    assert sorted(p.name for p in out.iterdir()) == ["q_map.png"]
    assert (out / "q_map.png").read_bytes() == b"earlier run"


def test_figure_names_cover_every_quantity():
    from spotflat.pipeline import QUANTITY_PAIRS

    for q, against in QUANTITY_PAIRS.items():
        if q != "flux":
            assert f"{q}_vs_{against}.png" in FIGURE_NAMES


def test_correlate_cli_says_which_figures_it_removed(demo, run_cli, tmp_path):
    """A correlate run into a folder holding an earlier run's figure removes it and says so."""
    out, outdir = demo
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "mismatch_recovery.png").write_bytes(b"stale")
    (tmp_path / "r" / "notes.png").write_bytes(b"mine")
    res = run_cli("correlate", outdir / "calib.fits", "--flat", out["sim"].flat_path, "-o", tmp_path / "r",
                  "--nboot", "20", "--nnull", "20", "-q")
    assert res.exit_code == 0, res.output
    assert "removed stale figures of an earlier run: mismatch_recovery.png" in res.output
    assert not (tmp_path / "r" / "mismatch_recovery.png").exists()
    assert (tmp_path / "r" / "notes.png").exists()


def test_unit_scale_short_ticks():
    assert plots.unit_scale(np.array([1e-4, -5e-4])) == (1e6, "ppm")
    assert plots.unit_scale(np.array([3e-3, 1e-2])) == (1e2, "%")
    assert plots.unit_scale(np.array([2e-4]), "1/pix") == (1e6, "ppm/pix")
    assert plots.unit_scale(np.array([0.01]), "pix") == (1e3, "mpix")
    assert plots.unit_scale(np.array([2.0]), "pix") == (1.0, "pix")


def test_shape_quantities_and_an_unnamed_detector(demo):
    """xx, yy, xy figures and a detector the geometry does not know: still complete figures."""
    import dataclasses

    from astropy.table import Table

    from spotflat.pipeline import CorrelateResult, correlate_quantities

    res = demo[0]["result"]
    comp = dataclasses.replace(res.comparison, detector="")
    out = correlate_quantities(comp, quantities=("flux", "xx", "yy", "xy", "xx-yy"), nboot=10, nnull=10,
                               block="patch", patch_size=7)
    table, stats = out[0], out[1]
    bare = CorrelateResult(results=table, comparison=comp, stats=stats, variance={}, amp_summary=Table(),
                           boundary_summary=None)
    figs = render_figures(bare)
    assert {"xx_vs_d2qdx2.png", "yy_vs_d2qdy2.png", "xy_vs_d2qdxdy.png", "xx-yy_vs_d2q_xx-yy.png",
            "residual_map.png"} <= set(figs)
    assert list(table["against"][table["component"] == "all"]) == ["q", "d2qdx2", "d2qdy2", "d2qdxdy", "d2q_xx-yy"]
    assert "amp_residuals.png" not in figs and "residual_vs_boundary.png" not in figs
    for name, fig in figs.items():
        check_figure(name, fig)
    assert "QE: Δxy = xx·yy" in _texts(figs["xy_vs_d2qdxdy.png"])


def test_the_check_catches_what_the_old_figures_did():
    """The old scatter: no units, crowded tick labels (-0.00075-0.00050): the check fails on it."""
    fig, ax = plots.new_axes()
    x = np.linspace(-8.5e-4, 8.5e-4, 50)
    ax.plot(x, x)
    ax.set_xticks(np.arange(-7.5e-4, 7.6e-4, 1.25e-4))
    ax.set_xlabel("dqdx")
    ax.set_ylabel("dx")
    ax.set_title("dx vs dqdx")
    with pytest.raises(AssertionError, match="no unit"):
        check_figure("old", fig)
    ax.set_xlabel("dqdx [1/pix]")
    ax.set_ylabel("dx [pix]")
    with pytest.raises(AssertionError, match="overlapping"):
        check_figure("old", fig)


def test_figures_of_the_real_catalogue(real_catalogue, tmp_path):
    """The real 2019 single-exposure catalogue: spot map and a binned flux map read without guessing."""
    import shutil

    import spotflat
    from spotflat.geometry import ccd_shape

    copy = tmp_path / real_catalogue.name
    shutil.copy(real_catalogue, copy)
    grids = spotflat.read_grids(copy)
    f = grids.flux[:, 0]
    rel = f / np.nanmedian(f) - 1
    fig = plots.plot_spot_map(grids.x[:, 0], grids.y[:, 0], f, detector=grids.detector,
                              title=f"Spot flux ({grids.detector}, real)", label="flux [counts]")
    check_figure("real spot map", fig)
    shape = ccd_shape(grids.detector)
    c = choose_map_bin(grids.x, grids.y, rel[:, None], shape, per_spot=False)
    assert np.isfinite(c.noise) and c.bin in c.tried
    fig = plots.plot_ccd_map(c.map, bin=c.bin, detector=grids.detector, title="Spot flux / median − 1 (real)",
                             label="flux / median − 1", unit="", symmetric=True, center=0.0, count=c.count,
                             cmap="RdBu_r", note=c.describe(*plots.unit_scale(c.map)))
    check_figure("real flux map", fig)


def test_stale_figures_go_only_when_the_whole_set_lands(tmp_path):
    """Inside a larger staged set, a stale figure stays until the set is in place, and stays if it fails."""
    from spotflat.fileio import atomic_path, staged_outputs

    out = tmp_path / "results"
    out.mkdir()
    (out / "xy_vs_q.png").write_bytes(b"old")
    fig, ax = plots.new_axes()
    ax.plot([0, 1])
    with pytest.raises(RuntimeError):
        with staged_outputs():
            write_figure_set({"t_vs_q.png": fig}, out)
            assert (out / "xy_vs_q.png").exists() and not (out / "t_vs_q.png").exists()
            raise RuntimeError("a later output failed")
    assert sorted(p.name for p in out.iterdir()) == ["xy_vs_q.png"]
    with staged_outputs():
        files = write_figure_set({"t_vs_q.png": fig}, out)
        with atomic_path(out / "results.ecsv") as tmp:
            tmp.write_text("# table")
        assert (out / "xy_vs_q.png").exists()
    assert [p.name for p in files.removed] == ["xy_vs_q.png"]
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "results.ecsv", "t_vs_q.png"]
