"""``spotflat demo``: the whole chain on simulated data (placeholder until correlate lands)."""

from __future__ import annotations

import click

__all__ = ["demo"]


@click.command()
@click.argument("outdir", required=False, default="spotflat-demo")
def demo(outdir: str) -> None:
    """Simulate, calibrate and correlate a small run into OUTDIR."""
    click.echo("spotflat demo: not yet available (needs the simulate and correlate stages).")
