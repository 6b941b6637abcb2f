"""Helpers shared by the sub-commands."""

from __future__ import annotations

import math

import click

__all__ = ["echo_summary", "csv_option", "POSITIVE", "explain_groups"]


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


class PositiveFloat(click.ParamType):
    """A finite number > 0 (``nan``, ``inf``, zero and negatives are refused, naming the option)."""

    name = "float"

    def convert(self, value, param, ctx):
        if isinstance(value, float) and math.isfinite(value) and value > 0:
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number; expected a finite number > 0", param, ctx)
        if not math.isfinite(number) or number <= 0:
            self.fail(f"{value!r}: expected a finite number > 0", param, ctx)
        return number


POSITIVE = PositiveFloat()


def explain_groups(groups: dict, min_dithers: int, where) -> None:
    """Refuse detector groups too small to calibrate, saying why and how to fix it.

    A single exposure: name it and suggest ``--min-dithers 1``. A stray file
    (of another or an unknown detector) beside a real run: name it and
    suggest removing it or ``--detector``.
    """
    from ..errors import InputError

    small = {d: ps for d, ps in groups.items() if len(ps) < min_dithers}
    if not small:
        return
    big = {d: ps for d, ps in groups.items() if len(ps) >= min_dithers}
    det, paths = next(iter(small.items()))
    names = ", ".join(p.name for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
    label = det or "no known detector (neither file name nor RAFTBAY/CCDSLOT header says)"
    if big:
        main, mpaths = max(big.items(), key=lambda kv: len(kv[1]))
        raise InputError(f"{len(paths)} stray file(s) of {label} ({names}) beside {len(mpaths)} files of "
                         f"{main or 'an unnamed detector'}: too few to calibrate (--min-dithers {min_dithers})",
                         path=paths[0], expected=f"remove the stray file(s), or pass --detector {main}"
                         if main else "remove the stray file(s)")
    raise InputError(f"only {len(paths)} exposure(s) of {label} ({names}), fewer than --min-dithers {min_dithers}",
                     path=paths[0] if len(paths) == 1 else where,
                     expected="more dithers, or --min-dithers 1 to calibrate from a single exposure")
