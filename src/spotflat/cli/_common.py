"""Helpers shared by the sub-commands."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterable, Iterator

import click

__all__ = ["echo_summary", "csv_option", "progress"]


@contextlib.contextmanager
def progress(items: Iterable, label: str, quiet: bool = False) -> Iterator[Iterable]:
    """A click progress bar over ``items`` (on standard error), or the bare items when quiet."""
    if quiet:
        yield items
        return
    with click.progressbar(items, label=label, show_pos=True, file=sys.stderr) as bar:
        yield bar


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
