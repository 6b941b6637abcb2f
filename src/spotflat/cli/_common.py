"""Helpers shared by the sub-commands."""

from __future__ import annotations

import click

from ..progress import progress_iter as progress

__all__ = ["echo_summary", "csv_option", "progress"]


def echo_summary(title: str, rows: list[tuple[str, object]]) -> None:
    """Print a short aligned ``key: value`` block to standard output."""
    click.echo(title)
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        click.echo(f"  {key:<{width}}  {value}")


def csv_option(value: str | None) -> list[str] | None:
    """Split a comma-separated option value into a list (``None`` stays ``None``)."""
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]
