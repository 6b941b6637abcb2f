"""The ``spotflat`` command line: a thin layer over the library.

Each sub-command lives in its own module here and is imported only when it
is run, so ``spotflat --help`` stays fast. Errors caused by the input are
reported as one line on standard error with exit code 1; bad usage exits
with 2 (click's convention). Set ``SPOTFLAT_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import importlib
import os

import click

from ..errors import SpotflatError

__all__ = ["main"]

# command name -> (module, function); modules are imported lazily
_COMMANDS = {
    "calibrate": ("calibrate", "calibrate"),
    "correlate": ("correlate", "correlate"),
    "coords": ("coords", "coords"),
    "response": ("response", "response"),
    "plot": ("plot", "plot"),
    "simulate": ("simulate", "simulate"),
    "demo": ("demo", "demo"),
}


def _available() -> list[str]:
    here = os.path.dirname(__file__)
    return [name for name, (mod, _) in _COMMANDS.items()
            if os.path.exists(os.path.join(here, f"{mod}.py"))]


class _SpotflatGroup(click.Group):
    """Group that loads sub-commands lazily and turns data errors into exit 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return _available()

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in _available():
            return None
        mod, func = _COMMANDS[name]
        return getattr(importlib.import_module(f".{mod}", __name__), func)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except SpotflatError as exc:
            _fail(exc)
        except OSError as exc:
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            _fail(f"{where}{exc.strerror or exc}", exc)
        except Exception as exc:  # last resort: still one line, no traceback
            _fail(f"unexpected error ({type(exc).__name__}): {exc}", exc)


def _fail(message, exc: BaseException | None = None) -> None:
    if os.environ.get("SPOTFLAT_DEBUG"):
        raise exc if exc is not None else message
    raise click.ClickException(str(message))


@click.group(cls=_SpotflatGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="spotflat")
def main() -> None:
    """Compare spot-projector throughput with CCOB flat fields (LSST Camera).

    \b
    Typical use:
      spotflat calibrate spotdata/ -o calib.fits
      spotflat correlate calib.fits --flat ccob_flat.fits -o results/
      spotflat demo            # the whole chain on simulated data
    """
